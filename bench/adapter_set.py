"""Adapter sets: one process holding N adapters of a base against N single-adapter processes, side by side.

  memory   peak RSS of one set process (trainers.load_adapter_set, N adapters) against the sum of N
           single-adapter processes (trainers.load_trained, one each): what N champions served today cost,
           N = 1, 3, 10. Every figure is a fresh subprocess's own peak (getrusage), after answering the same
           request of --rows rows (so activations match).
  latency  in the N = 10 set process: one mixed batch of R rows (every adapter's rows interleaved) against the
           same rows served per adapter (N requests of R / N rows), medians of --repeats; and the same rows
           answered by the single-adapter processes, one request each (their summed time).

The adapters are LoRA r8 on the attention query/value layers with a trained-size classification head
(modules_to_save), as the default sweep's arms are, with random non-zero weights: memory and latency do not
depend on what an adapter learned. Base: all-MiniLM-L6-v2 (default) or SmolLM2-135M (--model smollm2_135m).
Usage: python bench/adapter_set.py [--model minilm] [--rows 64] [--repeats 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SIZES = (1, 3, 10)


def make_adapters(model: str, n: int, dest: Path) -> list[str]:
    """n LoRA adapters of the base, each a folder as a trial ships it (safetensors, adapter_config.json, the
    trial config), weights drawn per adapter so no two answer alike."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    from sweeps.config import load
    from trainers.config import dump_trial_config
    from trainers.model import load_model, load_tokenizer
    from trainers.modules import resolve_target_modules

    cfg = load([f"model={model}", "method.r=8", "method.alpha=16"]).trial
    tokenizer = load_tokenizer(cfg)
    dirs = []
    for i in range(n):
        torch.manual_seed(100 + i)
        base = load_model(cfg, len(cfg.task.labels), tokenizer, "cpu")
        targets = resolve_target_modules(base, cfg.method.target_modules)
        net = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules=targets,
                                              init_lora_weights=False))
        out = dest / f"adapter-{i}"
        net.save_pretrained(out, safe_serialization=True)
        dump_trial_config(cfg, str(out / "peftsweep_trial.yaml"))
        dirs.append(str(out))
    return dirs


def texts(rows: int) -> list[str]:
    from sweeps.config import load
    from trainers.data import load_splits

    task = load([]).trial.task
    return list(load_splits(task)["test"]["text"].head(rows))


def child(args) -> None:
    """One serving process: load, answer, report its peak RSS (and timings) as one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    adapters = args.adapters.split(",")
    rows = texts(args.rows)
    out: dict = {}
    if args.child == "single":
        from trainers import load_trained, predict_texts

        model, tokenizer, cfg = load_trained(adapters[0], device="cpu")
        predict_texts(model, tokenizer, cfg, rows, "cpu")  # the same request as the set's: same activations
        share = rows[args.index::args.of]  # the rows of the mixed request that are this adapter's
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            predict_texts(model, tokenizer, cfg, share, "cpu")
            times.append(time.perf_counter() - start)
        out["s"] = statistics.median(times)
    else:
        from trainers import load_adapter_set, predict_set

        names = [f"a{i}" for i in range(len(adapters))]
        model, tokenizer, cfgs = load_adapter_set(dict(zip(names, adapters)), device="cpu")
        mixed = [names[i % len(names)] for i in range(len(rows))]
        predict_set(model, tokenizer, cfgs, rows, mixed, "cpu")
        if args.latency:
            per: dict[str, list[float]] = {"mixed": [], "per_adapter": []}
            for _ in range(args.repeats):
                start = time.perf_counter()
                predict_set(model, tokenizer, cfgs, rows, mixed, "cpu")
                per["mixed"].append(time.perf_counter() - start)
                start = time.perf_counter()
                for name in names:  # one request per adapter, its rows only
                    mine = [r for r, n in zip(rows, mixed) if n == name]
                    predict_set(model, tokenizer, cfgs, mine, [name] * len(mine), "cpu")
                per["per_adapter"].append(time.perf_counter() - start)
            out.update({k: statistics.median(v) for k, v in per.items()})
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print(json.dumps(out))


def run_child(kind: str, adapters: list[str], args, latency: bool = False, index: int = 0, of: int = 1) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--adapters", ",".join(adapters), "--rows", str(args.rows),
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--model", args.model,
           "--index", str(index), "--of", str(of)]
    proc = subprocess.run(cmd + (["--latency"] if latency else []), capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="model config: minilm | smollm2_135m")
    parser.add_argument("--rows", type=int, default=64, help="rows of the mixed request")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["single", "set"], help=argparse.SUPPRESS)
    parser.add_argument("--adapters", help=argparse.SUPPRESS)
    parser.add_argument("--latency", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--of", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    n_max = max(SIZES)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"Making {n_max} LoRA r8 adapters (+ head) of {args.model} ...", flush=True)
        dirs = make_adapters(args.model, n_max, Path(tmp))
        singles = [run_child("single", [d], args, index=i, of=n_max) for i, d in enumerate(dirs)]
        sets = {n: run_child("set", dirs[:n], args, latency=n == n_max) for n in SIZES}
    print(f"\nPeak RSS, {args.model}, CPU, {args.threads} threads (each process after answering a request):")
    print(f"{'N':>3}  {'one set process':>16}  {'N single processes':>19}  {'saved':>8}  {'ratio':>6}")
    for n in SIZES:
        one, many = sets[n]["peak_rss_gb"], sum(s["peak_rss_gb"] for s in singles[:n])
        print(f"{n:3d}  {one:13.2f} GB  {many:16.2f} GB  {many - one:5.2f} GB  {many / one:5.2f}x")
    mixed, per = sets[n_max]["mixed"], sets[n_max]["per_adapter"]
    alone = sum(s["s"] for s in singles)
    print(f"\nLatency, {args.rows} rows of {n_max} adapters (medians of {args.repeats}):")
    print(f"  one mixed batch in the set process         {1e3 * mixed:8.1f} ms")
    print(f"  per adapter in the set process ({n_max} requests)  {1e3 * per:8.1f} ms   mixed / per adapter = "
          f"{mixed / per:.2f}")
    print(f"  per adapter, {n_max} single processes (summed)    {1e3 * alone:8.1f} ms   mixed / single processes = "
          f"{mixed / alone:.2f}")


if __name__ == "__main__":
    main()
