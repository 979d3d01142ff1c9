"""`peftsweep serve-set`: several registered adapters of one base as one MLflow pyfunc, registered as a model
of its own. One process loads the base once and every adapter by name (trainers/adapters.py); a request names
the adapter per row (an `adapter` column) or for the whole request (`params={"adapter": ...}`), and rows of
different adapters run in one mixed batch. `__base__` answers with the untouched base.

Refused before anything is registered, each in one line: adapters of different bases (by the content hash or
revision promotion recorded), different task types or label counts, quantization modes, a method other
than LoRA (PEFT mixes LoRA adapters only), and DoRA (PEFT's mixed batches do not support it: serve it alone,
as its own champion). An unknown adapter in a request fails that request (HTTP 400), not the server.

    python -m evaluation.adapter_set models:/<set>/<version> N   (MLFLOW_TRACKING_URI names the store)
is the set's fresh-process check: the first N test rows of every adapter in one mixed request, as JSON.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow.pyfunc

from trainers import record, tracking
from trainers.config import TrialConfig, load_trial_config

MANIFEST = "adapter_set.json"
SET_ARTIFACT = "adapters"
SET_TAG = "peftsweep.adapter_set"  # on the set's versions: never taken for an adapter
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a column value, a folder, a vLLM --lora-modules name
# The fresh-process check: each adapter's first rows of its test split, against what its run logged. 16 rows
# per adapter cost about a second on CPU; a mixed batch may move a near-tie by float rounding, so 90 % must agree.
CHECK_ROWS = 16
CHECK_AGREEMENT = 0.9
SHIPPED = ("adapter_model.safetensors", "adapter_config.json", record.TRIAL_CONFIG_FILE, "README.md")


class SetRefused(RuntimeError):
    """The adapters cannot be served (or exported) together, or the set failed its check; nothing changed."""


@dataclass
class Adapter:
    name: str
    uri: str  # models:/<model>/<version>
    version: object  # the registry's ModelVersion
    path: str  # the local adapter folder
    config: dict  # adapter_config.json
    base: dict  # base_model.json: path, sha256, revision
    cfg: TrialConfig


def champions(client, base: str | None = None, alias: str = "champion") -> list[str]:
    """`models:/<name>@<alias>` of every registered adapter with that alias, narrowed to one base (its path as
    trained, or a prefix of its sha256 or revision); several bases and no `base`: refused, listing them."""
    from mlflow.exceptions import MlflowException

    found: dict[str, list[str]] = {}
    for model in client.search_registered_models():
        try:
            version = client.get_model_version_by_alias(model.name, alias)
        except MlflowException:
            continue
        tags = version.tags
        if tags.get(SET_TAG) or "base_model" not in tags:
            continue
        if base and base not in (tags["base_model"], tags.get("base_model_name")) and not any(
                tags.get(k, "").startswith(base) for k in ("base_model_sha256", "base_model_revision") if tags.get(k)):
            continue
        key = f"{tags['base_model']} ({(tags.get('base_model_sha256') or tags.get('base_model_revision') or '?')[:12]})"
        found.setdefault(key, []).append(f"models:/{model.name}@{alias}")
    if not found:
        raise SetRefused(f"no registered adapter has alias @{alias}" + (f" on base {base!r}" if base else ""))
    if len(found) > 1:
        raise SetRefused(f"@{alias} adapters of {len(found)} bases: {'; '.join(sorted(found))}: pick one with --base")
    return sorted(next(iter(found.values())))


def fetch(client, tracking_uri: str, specs: list[str], dest: str) -> list[Adapter]:
    """Each `[name=]models:/<model>@<alias>` or `models:/<model>/<version>` downloaded into `dest`; its name
    is `name`, else the registered model's."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from trainers import BASE_ADAPTER, BASE_MODEL_FILE

    adapters = []
    for spec in specs:
        name, _, uri = spec.rpartition("=") if "=" in spec.split("models:/")[0] else ("", "", spec)
        match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", uri)
        if not match:
            raise SetRefused(f"{spec!r} is not models:/<name>@<alias> or models:/<name>/<version>")
        model, alias, number = match.groups()
        try:
            version = client.get_model_version_by_alias(model, alias) if alias else client.get_model_version(model,
                                                                                                            number)
        except MlflowException:
            raise SetRefused(f"{uri}: no such registered model version") from None
        name = name or model
        if not NAME.match(name) or name == BASE_ADAPTER:
            raise SetRefused(f"adapter name {name!r}: use letters, digits, '.', '_' or '-' (not {BASE_ADAPTER})")
        if name in {a.name for a in adapters}:
            raise SetRefused(f"two adapters named {name!r}: name them, e.g. {name}-v{version.version}={uri}")
        if version.tags.get(SET_TAG):
            raise SetRefused(f"{uri} is an adapter set, not an adapter")
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model}/{version.version}",
                                                    tracking_uri=tracking_uri, dst_path=str(Path(dest, name)))
        weights = Model.load(local).flavors["python_function"].get("artifacts", {}).get("weights")
        if not weights:
            raise SetRefused(f"{uri} holds no adapter folder (not a peftsweep champion)")
        path = str(Path(local, weights["path"]))
        base_file = Path(path, BASE_MODEL_FILE)
        adapters.append(Adapter(name, f"models:/{model}/{version.version}", version, path,
                                json.loads(Path(path, "adapter_config.json").read_text()),
                                json.loads(base_file.read_text()) if base_file.exists() else {},
                                load_trial_config(str(Path(path, record.TRIAL_CONFIG_FILE)))))
    return adapters


def base_of(adapter: Adapter) -> str:
    """The base an adapter needs, as compared: its content hash, else its revision, else its path."""
    b = adapter.base
    return (f"sha256 {b['sha256'][:16]}…" if b.get("sha256") else f"revision {b['revision']}" if b.get("revision")
            else f"unpinned {b.get('path') or adapter.cfg.model.path}")


def refuse_mixed(adapters: list[Adapter]) -> None:
    """SetRefused, in one line, unless one process can serve every adapter in mixed batches."""
    if not adapters:
        raise SetRefused("no adapter to put in the set")
    for a in adapters:
        if a.config.get("peft_type") != "LORA":
            raise SetRefused(f"{a.name} ({a.uri}) is a {a.config.get('peft_type')} adapter: a set mixes LoRA "
                             f"adapters only (PEFT loads one kind per model); serve it alone")
        if a.config.get("use_dora"):
            raise SetRefused(f"{a.name} ({a.uri}) is a DoRA adapter: PEFT's mixed batches do not support DoRA; "
                             f"serve it alone (its own champion)")
    first = adapters[0]
    for a in adapters[1:]:
        for what, of in (("base", base_of), ("task type", lambda x: x.cfg.task.type),
                         ("label count", lambda x: len(x.cfg.task.labels) if x.cfg.task.type != "sft" else 0),
                         ("quantization of the base", lambda x: x.cfg.quant.mode)):
            if of(a) != of(first):
                raise SetRefused(f"{a.name} and {first.name} differ in {what} ({of(a)} vs {of(first)}): "
                                 f"a set shares one base, loaded once")
        if first.cfg.task.type == "causal_lm_sft" and list(a.cfg.task.labels) != list(first.cfg.task.labels):
            raise SetRefused(f"{a.name} and {first.name} score different label answers: a causal-LM "
                             f"classification set needs one label list")


class AdapterSet(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from trainers import load_adapter_set

        root = Path(context.artifacts[SET_ARTIFACT])
        self.manifest = json.loads((root / MANIFEST).read_text())
        names = [a["name"] for a in self.manifest["adapters"]]
        self.model, self.tokenizer, self.cfgs = load_adapter_set({n: str(root / n) for n in names})

    def predict(self, context, model_input, params=None):
        from trainers import BASE_ADAPTER, predict_set

        from evaluation.serving import request_inputs

        inputs = request_inputs(model_input, self.cfgs[BASE_ADAPTER])
        default = (params or {}).get("adapter") or None
        cells = list(model_input["adapter"]) if hasattr(model_input, "columns") and "adapter" in model_input else []
        names = [str(c) if isinstance(c, str) and c else default for c in cells] or [default] * len(inputs)
        unknown = sorted({str(n) for n in names if n not in self.cfgs})
        if unknown:
            from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

            served = ", ".join(n for n in self.cfgs if n != BASE_ADAPTER)
            what = ("rows name no adapter: add an `adapter` column or params={'adapter': ...}" if "None" in unknown
                    else f"unknown adapter {', '.join(map(repr, unknown))}")
            raise MlflowException(f"{what}; this set serves {served} and {BASE_ADAPTER}",
                                  error_code=INVALID_PARAMETER_VALUE)
        return predict_set(self.model, self.tokenizer, self.cfgs, inputs, names)


def save_set_pyfunc(set_dir: str, dest: str) -> str:
    """An MLflow model folder wrapping the set's adapter folders (models-from-code: no pickle)."""
    import warnings
    from importlib.metadata import version

    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    pins = [f"{lib}=={version(lib)}" for lib in ("torch", "transformers", "peft", "mlflow")]
    # no input schema: rows carry `text`, `prompt` or `messages` (a list of dicts) and optionally `adapter`;
    # the one param names the adapter for every row without one
    signature = ModelSignature(inputs=None, params=ParamSchema([ParamSpec("adapter", "string", "")]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mlflow.pyfunc.save_model(dest, python_model=str(Path(__file__).with_name("adapter_set_entry.py")),
                                 artifacts={SET_ARTIFACT: set_dir}, signature=signature, pip_requirements=pins)
    return dest


def build_set(client, tracking_uri: str, experiment: str, specs: list[str], name: str | None = None,
              alias: str = "champion", base: str | None = None) -> dict:
    """Fetch, check, save, register and check the set in a fresh process; the alias moves only after that."""
    from mlflow.exceptions import MlflowException

    specs = specs or champions(client, base)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = fetch(client, tracking_uri, specs, f"{tmp}/dl")
        refuse_mixed(adapters)
        first = adapters[0]
        name = name or f"{first.cfg.model.name}-set"
        set_dir = Path(tmp, SET_ARTIFACT)
        for a in adapters:  # the adapter and what it needs, not the model card's copy of a sweep's table
            (set_dir / a.name).mkdir(parents=True)
            for f in (*SHIPPED, "base_model.json"):
                if Path(a.path, f).exists():
                    shutil.copy2(Path(a.path, f), set_dir / a.name / f)
        manifest = {"adapters": [{"name": a.name, "uri": a.uri, "run_id": a.version.run_id, "r": a.config.get("r"),
                                  "arm": a.version.tags.get("arm", "")} for a in adapters],
                    "base": first.base, "task_type": first.cfg.task.type}
        (set_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
        pyfunc = save_set_pyfunc(str(set_dir), f"{tmp}/pyfunc_model")
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        run = client.create_run(exp_id, run_name=f"adapter-set-{name}", tags={record.ROLE: "adapter_set"})
        client.log_artifacts(run.info.run_id, pyfunc, "pyfunc_model")
        tracking.write_status(client, run.info.run_id, "ok")  # the one writer of a run's outcome
    try:
        client.create_registered_model(name, description="Adapter sets built by peftsweep serve-set")
    except MlflowException:
        pass  # exists already: add a version
    tags = {SET_TAG: "true", "adapters": " ".join(f"{a.name}={a.uri}" for a in adapters),
            "base_model": first.base.get("path") or first.cfg.model.path,
            "base_model_sha256": first.base.get("sha256") or "", "task_type": first.cfg.task.type}
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/pyfunc_model",
                                          run_id=run.info.run_id, tags=tags)
    uri = f"models:/{name}/{version.version}"
    try:
        agreement = check_set(client, uri, tracking_uri, adapters)
    except SetRefused as exc:
        client.set_model_version_tag(name, version.version, "reload_check", f"failed: {str(exc)[:400]}")
        raise SetRefused(f"{exc}; alias {alias!r} unchanged") from None
    client.set_registered_model_alias(name, alias, version.version)
    client.set_model_version_tag(name, version.version, "reload_check", json.dumps(agreement))
    return {"name": name, "version": version.version, "alias": alias, "uri": f"models:/{name}@{alias}",
            "adapters": [(a.name, a.uri) for a in adapters], "base": base_of(first), "agreement": agreement}


def check_set(client, uri: str, tracking_uri: str, adapters: list[Adapter]) -> dict:
    """Load the set in a fresh process, answer every adapter's first test rows in one mixed request, and
    compare with what each adapter's own run logged for those rows; SetRefused if they disagree."""
    from trainers.tracking import load_row_scores

    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    proc = subprocess.run([sys.executable, "-m", "evaluation.adapter_set", uri, str(CHECK_ROWS)], capture_output=True,
                          text=True, env=env, cwd=str(Path(__file__).resolve().parent.parent))
    if proc.returncode != 0:
        raise SetRefused(f"{uri} does not load: {(proc.stderr.strip().splitlines() or ['(no output)'])[-1]}")
    answers = json.loads(proc.stdout.strip().splitlines()[-1])
    agreement = {}
    for a in adapters:
        logged = load_row_scores(client, a.version.run_id, "test")
        column = "generation" if a.cfg.task.type == "sft" else "prediction"
        expected = [str(v) for v in logged[column]][: len(answers[a.name])]
        same = sum(x == y for x, y in zip(answers[a.name], expected)) / max(1, len(expected))
        if same < CHECK_AGREEMENT:
            raise SetRefused(f"{a.name} answers {100 * same:.0f} % of its first {len(expected)} test rows as its run "
                             f"logged them, in the set (needs {100 * CHECK_AGREEMENT:.0f} %)")
        agreement[a.name] = round(same, 3)
    return agreement


def _answer_rows(uri: str, rows: int) -> dict:
    import pandas as pd

    from trainers import input_column, split_inputs

    model = mlflow.pyfunc.load_model(uri)
    loaded = model.unwrap_python_model()
    names = [a["name"] for a in loaded.manifest["adapters"]]
    inputs = {n: split_inputs(loaded.cfgs[n], "test")[:rows] for n in names}
    # interleaved, so each batch mixes every adapter
    order = [(n, i) for i in range(rows) for n in names if i < len(inputs[n])]
    column = input_column(loaded.cfgs[names[0]])
    out = model.predict(pd.DataFrame({column: [inputs[n][i] for n, i in order], "adapter": [n for n, _ in order]}))
    answers: dict = {n: [] for n in names}
    for (n, _), answer in zip(order, out):
        answers[n].append(answer)
    return answers


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    print(json.dumps(_answer_rows(sys.argv[1], int(sys.argv[2]))))
