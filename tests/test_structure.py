"""Rules of structure that are checks, not comments: the import contracts cover every module, one module
writes a run's status, and a trial runs without Ray or Hydra."""
import ast
import configparser
import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PUBLIC = {"__init__", "record", "tracking", "config"}  # trainers' public API (see trainers/__init__.py)


def test_every_internal_trainers_module_is_protected_by_the_contract():
    contracts = configparser.ConfigParser()
    contracts.read(REPO / ".importlinter")
    protected = set(contracts["importlinter:contract:trainers-public-api"]["protected_modules"].split())
    modules = {p.stem for p in (REPO / "trainers").glob("*.py")} - PUBLIC
    assert protected == {f"trainers.{m}" for m in modules}


def test_the_import_contracts_catch_a_trainer_that_imports_upward(tmp_path):
    """`make test` runs lint-imports on the tree; this proves the contracts would fail it: a copy of the
    packages where a trainers module imports the sweep layer (and Ray) breaks the layering contracts."""
    import shutil

    for item in ("sweeps", "evaluation", "trainers", ".importlinter"):
        copy = shutil.copytree if (REPO / item).is_dir() else shutil.copy
        copy(REPO / item, tmp_path / item)
    loop = tmp_path / "trainers" / "loop.py"
    loop.write_text(loop.read_text().replace("import torch\n", "import torch\n\nimport ray  # noqa\nimport sweeps.plan  # noqa\n", 1))
    proc = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0, proc.stdout[-3000:]
    broken = {line.split(" BROKEN")[0].strip() for line in proc.stdout.splitlines() if line.endswith("BROKEN")}
    assert broken == {"sweeps above evaluation above trainers",
                      "a trial runs without Ray or Hydra (python -m trainers)"}, proc.stdout[-3000:]


def _writes_status(node: ast.Call) -> bool:
    name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
    if name == "set_terminated":
        return True
    mentions = any(isinstance(n, ast.Attribute) and n.attr == "STATUS" for arg in [*node.args, *node.keywords]
                   for n in ast.walk(arg))
    return name in ("set_tag", "set_tags", "log_batch", "create_run") and mentions


def test_only_the_tracking_module_writes_a_run_status():
    writers = []
    for package in ("trainers", "sweeps", "evaluation"):
        for path in (REPO / package).glob("*.py"):
            if path.name == "tracking.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and _writes_status(node):
                    writers.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not writers, writers


def test_a_trial_runs_without_ray_or_hydra_and_never_imports_mlflow(tiny_bert, store):
    """`python -m trainers` end to end in a fresh interpreter that never imports Ray, Hydra or OmegaConf, nor
    MLflow: its run is written whole by the trial's writer process (trainers/trial_run.py)."""
    from mlflow.tracking import MlflowClient

    from trainers import record

    # the entry point ends the process itself (after the atexit handlers), so the check is one of them
    script = (
        "import atexit, sys, runpy\n"
        "atexit.register(lambda: print('LOADED', sorted(m for m in ('ray', 'hydra', 'omegaconf', 'mlflow') "
        "if m in sys.modules)))\n"
        f"sys.argv = ['trainers', 'model.path={tiny_bert}', 'model.name=tiny-bert', 'tracking.uri={store['uri']}',"
        " 'task.train_size=32', 'task.validation_size=16', 'task.test_size=16', 'train.max_steps=2', '--json']\n"
        "runpy.run_module('trainers', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=store["dir"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "LOADED []" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert result["status"] == "ok"
    run = MlflowClient(store["uri"]).get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags[record.STATUS] == "ok"
    assert run.data.metrics["test_accuracy"] == result["test_accuracy"] and run.data.params["method"] == "lora"


def test_a_config_group_on_the_ray_free_entry_point_points_to_peftsweep_trial(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainers", "model=smollm2_135m"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 'model=smollm2_135m' selects a config group: "
                                                           "run `peftsweep trial model=smollm2_135m`")
