"""bench/gpu_table.py on a real CUDA device, 135m size (SmolLM2-135M's shape, random weights)."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


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


def test_lora_uses_less_peak_memory_than_full_ft(arms):
    full = arms["full"]["peak_allocated_gib"]
    assert arms["lora_attn"]["peak_allocated_gib"] < full
    assert arms["lora_all"]["peak_allocated_gib"] < full
    assert arms["lora_all"]["mem_ratio_vs_full"] < 1.0


def test_qlora_uses_less_peak_memory_than_lora(arms):
    # Same targets and rank. The arms differ only in whether the base Linears are stored in bf16 or nf4.
    assert arms["qlora_nf4"]["peak_allocated_gib"] < arms["lora_all"]["peak_allocated_gib"]


def test_qlora_trains(arms):
    q = arms["qlora_nf4"]
    # The bench checks p.grad on every trainable parameter after every backward, including after an eval pass.
    assert q["grads_present_all_steps"] is True
    assert q["trainable_params"] == arms["lora_all"]["trainable_params"]
    losses = q["losses"]
    assert len(losses) == 22
    assert statistics.mean(losses[-5:]) < statistics.mean(losses[:5]) - 0.5, losses


def test_figures_are_sane(arms):
    for arm in arms.values():
        assert arm["tokens_per_s"] > 0
        assert arm["peak_reserved_gib"] >= arm["peak_allocated_gib"]
        if arm["mfu"] is not None:  # None only on a GPU missing from the peak table
            assert 0 < arm["mfu"] < 1
