"""CPU dropout: torch's nn.Dropout against peftsweep's CpuDropout (trainers/dropout.py), side by side in one run.

  masks   one dropout forward + backward on a MiniLM-sized activation ([16, 32, 384], p=0.1), alone
  steps   MiniLM LoRA r8 q,v training on Rotten Tomatoes, batch 16, grouped by length: two copies of the
          model, one with its dropouts as they come and one with them swapped, a step each in turn
  sft     the same for SmolLM2-135M LoRA r8 q,v on BBC headlines (only the adapters have dropout there)
Prints medians and the ratios torch / CpuDropout (> 1: the swap is faster), and the training loss of each, which
differs only by which elements the masks drop. Usage: python bench/dropout.py [--steps 60] [--rounds 3]
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


def steps(overrides: list[str], title: str, steps_: int) -> None:
    """Two copies of the same model (same weights, same batches), one with its dropouts swapped, trained a step
    each in turn, the order flipped every step: each step's time is measured beside its twin's, so a burst of
    machine noise lands on both, and the medians compare like with like."""
    import itertools

    from sweeps.config import load
    from trainers import batching, data, loop, scoring
    from trainers.dropout import use_cpu_dropout
    from trainers.methods import apply_method
    from trainers.model import load_model, load_tokenizer
    from trainers.modules import resolve_target_modules

    cfg = load(overrides).trial
    tokenizer = load_tokenizer(cfg)
    encoded = scoring.encode(data.load_splits(cfg.task)["train"], tokenizer, cfg)
    batches = list(itertools.islice(itertools.cycle(batching.train_loader(encoded, tokenizer, cfg)), steps_))
    arms = {}
    for name in ("torch nn.Dropout", "CpuDropout"):
        torch.manual_seed(cfg.train.seed)
        net = load_model(cfg, len(cfg.task.labels), tokenizer, "cpu")
        net = apply_method(net, cfg.method, resolve_target_modules(net, cfg.method.target_modules), cfg.task.type)
        swapped = use_cpu_dropout(net) if name == "CpuDropout" else 0
        net.train()
        optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.train.lr)
        arms[name] = {"net": net, "opt": optimizer, "ms": [], "loss": [], "swapped": swapped}
    autocast, scaler = loop.autocast_for("cpu", "fp32"), torch.amp.GradScaler("cpu", enabled=False)
    for i, batch in enumerate(batches):
        torch.manual_seed(i)  # both arms draw their masks from the same generator state
        for name in (list(arms) if i % 2 == 0 else list(reversed(arms))):
            arm = arms[name]
            start = time.perf_counter()
            loss = loop.forward_backward(arm["net"], dict(batch), "cpu", autocast, scaler)
            arm["opt"].step()
            arm["opt"].zero_grad(set_to_none=True)
            arm["ms"].append(1e3 * (time.perf_counter() - start))
            arm["loss"].append(loss)
    med = {name: statistics.median(arm["ms"]) for name, arm in arms.items()}
    print(f"\n{title}: {steps_} steps each, interleaved (median ms per step)")
    for name, arm in arms.items():
        print(f"  {name:18s} {med[name]:8.1f} ms/step  mean train loss {statistics.mean(arm['loss']):.4f}  "
              f"dropout modules swapped {arm['swapped']}")
    print(f"  ratio torch / CpuDropout: {med['torch nn.Dropout'] / med['CpuDropout']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3, help="mask timing rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-sft", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    masks(args.rounds)
    steps(["method.target_modules=[query,value]"], "MiniLM LoRA r8 q,v, Rotten Tomatoes, batch 16", args.steps)
    if not args.no_sft:
        steps(["model=smollm2_135m", "task=bbc_headlines", "train.batch_size=8", "task.train_size=400",
               "method.target_modules=[q_proj,v_proj]"], "SmolLM2-135M LoRA r8 q,v, BBC headlines, batch 8",
              max(4, args.steps // 8))


if __name__ == "__main__":
    main()
