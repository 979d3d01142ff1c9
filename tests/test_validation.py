"""Bad input gets one clear line per problem and exit code 2 before Ray starts or any run is written."""
import subprocess

import pytest

from sweeps.cli import main
from tests.conftest import BIN

CASES = [
    (["model.path=/nonexistent/model"], "model.path '/nonexistent/model': no such file or directory"),
    (["model.path=no-such-org/no-such-model-xyz"], "cannot load model 'no-such-org/no-such-model-xyz'"),
    (["search=tiny", "method.target_modules=[query,nonexistent_proj]"], "target module 'nonexistent_proj' is not a linear layer"),
    (["method.r=0"], "method.r must be a positive integer, got 0"),
    (["method.r=-4"], "method.r must be a positive integer, got -4"),
    (["search.space.method.r=[4,0]"], "method.r must be a positive integer, got 0"),
    (["task.text_column=review"], "text_column 'review' is not a column"),
    (["task.label_column=sentiment"], "label_column 'sentiment' is not a column"),
    (["task.labels=[fresh,stale]"], "label(s) ['stale'] never occur"),
    (["search.space.method.r=[4096]"], "method.r=4096 exceeds the smallest targeted layer dimension (384)"),
    (["method.dropout=1.0"], "method.dropout must be in [0, 1)"),
    (["train.lrr=1"], "unknown config key 'train.lrr'"),
    (["model=nope"], "Could not find 'model/nope' (available: hub, minilm, smollm2_135m)"),
    (["quant=nf4", "train.device=cuda"], "no CUDA device is visible"),
    (["search.baseline.quant.mode=nf4"], "full fine-tuning cannot train quantized weights"),
    (["method=full", "quant=nf4", "search.full_ft_arm=false", "search.space.method.r=[4]"],
     "full fine-tuning cannot train quantized weights"),
]


@pytest.mark.parametrize("overrides,message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_refused_before_ray(overrides, message, store, capsys):
    # tiny sizes so that a case wrongly accepted fails its asserts in seconds, not after a full sweep
    code = main(["sweep", f"tracking.uri={store['uri']}", "train.max_steps=1", "task.train_size=16",
                 "task.validation_size=16", "task.test_size=16", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert all(line.startswith("peftsweep: error: ") for line in err.strip().splitlines())
    assert not (store["dir"] / "ray_results").exists(), "Ray must not have started"
    assert not (store["dir"] / "mlflow.db").exists(), "no run may be written for a refused sweep"


def test_every_problem_is_listed_not_just_the_first(store, capsys):
    code = main(["plan", "search=tiny", "task.text_column=review", "method.target_modules=[nonexistent_proj]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 2, err


def test_real_cli_exit_code(store):
    proc = subprocess.run([str(BIN / "peftsweep"), "sweep", "method.r=0"], capture_output=True, text=True,
                          cwd=store["dir"], timeout=120)
    assert proc.returncode == 2
    assert "peftsweep: error: method.r must be a positive integer, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr
