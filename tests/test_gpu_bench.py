"""bench/gpu_table.py on a real CUDA device, 135m size (SmolLM2-135M's shape, random weights); and, on any
machine, bench/gpu_check.sh's CPU rehearsal: the results file a device call brings back has every field."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Per test, not per module: the rehearsal below runs in the CPU suite.
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def on_gpu(test):
    for mark in gpu:
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def arms(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_table")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_table.py"), "--device", "cuda", "--sizes", "135m",
         "--steps", "20", "--warmup", "2", "--batch", "8", "--seq", "512", "--out", str(out)],
        capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("gpu_table-*.json")
    res = json.loads(path.read_text())
    assert res["info"]["name"] == torch.cuda.get_device_name(0)
    got = {a["arm"]: a for a in res["sizes"]["135m"]["arms"]}
    for name, arm in got.items():
        assert arm["status"] == "ok", (name, arm)
    return got


@on_gpu
def test_lora_uses_less_peak_memory_than_full_ft(arms):
    full = arms["full"]["peak_allocated_gib"]
    assert arms["lora_attn"]["peak_allocated_gib"] < full
    assert arms["lora_all"]["peak_allocated_gib"] < full
    assert arms["lora_all"]["mem_ratio_vs_full"] < 1.0


@on_gpu
def test_qlora_uses_less_peak_memory_than_lora(arms):
    # Same targets and rank. The arms differ only in whether the base Linears are stored in bf16 or nf4.
    assert arms["qlora_nf4"]["peak_allocated_gib"] < arms["lora_all"]["peak_allocated_gib"]


@on_gpu
def test_qlora_trains(arms):
    q = arms["qlora_nf4"]
    # The bench checks p.grad on every trainable parameter after every backward, including after an eval pass.
    assert q["grads_present_all_steps"] is True
    assert q["trainable_params"] == arms["lora_all"]["trainable_params"]
    losses = q["losses"]
    assert len(losses) == 22
    assert statistics.mean(losses[-5:]) < statistics.mean(losses[:5]) - 0.5, losses


@on_gpu
def test_figures_are_sane(arms):
    for arm in arms.values():
        assert arm["tokens_per_s"] > 0
        assert arm["peak_reserved_gib"] >= arm["peak_allocated_gib"]
        if arm["mfu"] is not None:  # None only on a GPU missing from the peak table
            assert 0 < arm["mfu"] < 1


# What the results file must hold (issue 26). Listed here, not imported from the bench, so that a field
# dropped from the writer fails this test instead of vanishing from both sides.
INFO_FIELDS = ["name", "driver", "torch", "transformers", "peft", "bitsandbytes", "python"]
VERSION_FIELDS = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "evaluate", "pyarrow"]
ROW_FIELDS = ["size", "seq", "batch", "total_params", "arm", "status", "trainable_params", "peak_allocated_gib",
              "peak_reserved_gib", "peak_rss_gib", "tokens_per_s", "mfu", "mem_ratio_vs_full",
              "reserved_ratio_vs_full", "tokens_per_s_ratio_vs_full", "mfu_ratio_vs_full", "predicted_gib",
              "predicted_vs_measured", "estimate_within_tolerance"]
ESTIMATE_FIELDS = ["measured", "tolerance", "rows_checked", "within", "share", "line"]


def test_gpu_check_cpu_rehearsal_writes_every_field(tmp_path):
    """The bench part of the device call on CPU (no wheel install, no nested pytest), with the packages the
    device image lacks (Ray, MLflow, Hydra, the asset wheels) made unimportable, as they are there."""
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--sizes", "tiny", "--seqs", "64",
         "--skip", "wheels,pytest", "--simulate-device", "--out", str(tmp_path)],
        cwd=tmp_path, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("gpu_check-*.json")
    assert path.with_suffix(".md").exists() and (tmp_path / "gpu_check.log").exists()
    res = json.loads(path.read_text())

    for key in INFO_FIELDS:
        assert key in res["info"], key
    assert res["info"]["torch"] == torch.__version__ and res["info"]["name"].startswith("cpu")
    for key in VERSION_FIELDS:
        assert res["versions"].get(key), key
    assert {"ray", "mlflow", "hydra"} <= set(res["args"]["simulated_missing"])
    assert set(res["preflight"]["imports"].values()) == {"ok"}, res["preflight"]["imports"]
    assert res["pytest"]["summary"] == "not run: --skip pytest"
    assert {p["name"]: p["status"] for p in res["phases"]} == {
        "wheels": "skipped: --skip", "preflight": "ok", "pytest": "skipped: --skip", "table-tiny-64": "ok"}

    rows = {r["arm"]: r for r in res["rows"]}
    assert set(rows) == {"full", "lora_attn", "lora_all", "qlora_nf4"}
    for arm, row in rows.items():
        for key in ROW_FIELDS:
            assert key in row, (arm, key)
        assert (row["size"], row["seq"], row["batch"]) == ("tiny", 64, 4)
        if arm == "qlora_nf4" and row["status"].startswith("skipped"):  # bitsandbytes' CPU 4-bit is optional
            continue
        assert row["status"] == "ok", row
        assert row["tokens_per_s"] > 0 and row["peak_rss_gib"] > 0 and row["predicted_gib"] > 0
        assert row["predicted_vs_measured"] == pytest.approx(row["predicted_gib"] / row["peak_rss_gib"], rel=0.01)
        assert isinstance(row["estimate_within_tolerance"], bool)
    assert rows["full"]["mem_ratio_vs_full"] == 1.0 and rows["full"]["tokens_per_s_ratio_vs_full"] == 1.0

    check = res["estimate_check"]
    for key in ESTIMATE_FIELDS:
        assert key in check, key
    assert check["measured"] == "peak_rss_gib" and check["tolerance"] == 0.15
    assert check["rows_checked"] == sum(r["status"] == "ok" for r in rows.values())
    md = path.with_suffix(".md").read_text()
    assert "pytest -m gpu: not run" in md and check["line"] in md and "| lora_all | ok |" in md
