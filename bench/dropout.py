"""CPU dropout: torch's nn.Dropout against peftsweep's CpuDropout (trainers/dropout.py), side by side in one run.

  masks   one dropout forward + backward on a MiniLM-sized activation ([16, 32, 384], p=0.1), alone
  steps   MiniLM LoRA r8 q,v training on Rotten Tomatoes, batch 16, grouped by length: the same model, data
          and seed trained with its dropouts as they come and with them swapped, alternated
  sft     the same for SmolLM2-135M LoRA r8 q,v on BBC headlines (only the adapters have dropout there)
Prints medians and the ratios torch / CpuDropout (> 1: the swap is faster), and the training loss of each, which
differs only by which elements the masks drop. Usage: python bench/dropout.py [--steps 30] [--rounds 3]
[--threads 2] [--no-sft]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def masks(rounds: int) -> None:
    from trainers.dropout import CpuDropout

    x = torch.randn(16, 32, 384, requires_grad=True)
    grad = torch.ones_like(x)
    layers = {"torch nn.Dropout": torch.nn.Dropout(0.1), "CpuDropout": CpuDropout(0.1)}
    times: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(rounds * 10):
        for name, layer in layers.items():
            start = time.perf_counter()
            for _ in range(20):
                layer(x).backward(grad)
            times[name].append((time.perf_counter() - start) / 20 * 1e3)
    med = {name: statistics.median(t) for name, t in times.items()}
    print("\ndropout forward + backward, [16, 32, 384] fp32, p=0.1 (median ms)")
    for name, ms in med.items():
        print(f"  {name:18s} {ms:7.3f} ms")
    print(f"  ratio torch / CpuDropout: {med['torch nn.Dropout'] / med['CpuDropout']:.2f}x")


def steps(overrides: list[str], title: str, steps_: int, rounds: int) -> None:
    from sweeps.config import load
    from trainers import batching, data, loop, scoring
    from trainers.dropout import use_cpu_dropout
    from trainers.methods import apply_method
    from trainers.model import load_model, load_tokenizer
    from trainers.modules import resolve_target_modules

    cfg = load(overrides).trial
    cfg.train.max_steps = steps_
    tokenizer = load_tokenizer(cfg)
    encoded = scoring.encode(data.load_splits(cfg.task)["train"], tokenizer, cfg)

    def trained(swap: bool) -> tuple[float, float, int]:
        torch.manual_seed(cfg.train.seed)
        net = load_model(cfg, len(cfg.task.labels), tokenizer, "cpu")
        net = apply_method(net, cfg.method, resolve_target_modules(net, cfg.method.target_modules), cfg.task.type)
        swapped = use_cpu_dropout(net) if swap else 0
        out = loop.train(net, batching.train_loader(encoded, tokenizer, cfg), cfg.train, "cpu")
        return out["train_time_s"], out["train_loss"], swapped

    runs: dict[str, list] = {"torch nn.Dropout": [], "CpuDropout": []}
    for i in range(rounds):  # alternate who goes first: machine noise spreads over both
        for name in (list(runs) if i % 2 == 0 else list(reversed(runs))):
            runs[name].append(trained(name == "CpuDropout"))
    print(f"\n{title}: {steps_} steps (median of {rounds})")
    med = {name: statistics.median(r[0] for r in rs) for name, rs in runs.items()}
    for name, rs in runs.items():
        print(f"  {name:18s} train {med[name]:7.2f} s  ({1e3 * med[name] / steps_:6.1f} ms/step)  "
              f"train loss {rs[0][1]:.4f}  dropout modules swapped {rs[0][2]}")
    print(f"  ratio torch / CpuDropout: {med['torch nn.Dropout'] / med['CpuDropout']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-sft", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    masks(args.rounds)
    steps(["method.target_modules=[query,value]"], "MiniLM LoRA r8 q,v, Rotten Tomatoes, batch 16",
          args.steps, args.rounds)
    if not args.no_sft:
        steps(["model=smollm2_135m", "task=bbc_headlines", "train.batch_size=8", "task.train_size=400",
               "method.target_modules=[q_proj,v_proj]"], "SmolLM2-135M LoRA r8 q,v, BBC headlines, batch 8",
              max(4, args.steps // 5), args.rounds)


if __name__ == "__main__":
    main()
