"""How a packed sft step is best computed without varlen attention, measured side by side in one run.

The same SmolLM2-135M LoRA r8 q,v model trains on the same short BBC rows (articles cut at 100 characters,
~60 tokens) three ways, a few steps each, alternated:
  packed rows     rows of max_length whole examples, position ids restarting, no mask: SDPA then computes a
                  block-diagonal masked attention over each whole row
  packed chunks   the same steps' examples sorted by length, as chunks of batch_size padded rows whose losses
                  are weighted by their answer tokens (what trainers/batching.py does unless the attention
                  kernel is varlen flash attention)
  grouped         no packing: batches of batch_size rows of similar length
Prints forward+backward tokens/s (real tokens) of each and the ratios. Usage:
  python bench/attention_packing.py [--steps 4] [--max-length 512] [--threads 2]
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model

    from sweeps.config import load
    from trainers import batching, data, scoring
    from trainers.model import load_model, load_tokenizer

    cfg = load(["model=smollm2_135m", "task=bbc_headlines", "task.train_size=256", "task.input_max_chars=100",
                f"task.max_length={args.max_length}", "train.batch_size=8", "train.packing=true"]).trial
    tokenizer = load_tokenizer(cfg)
    encoded, _ = scoring.encode_counted(data.load_splits(cfg.task)["train"], tokenizer, cfg)
    model = get_peft_model(load_model(cfg, 0, tokenizer, "cpu"),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model.train()
    rows = batching.pack(encoded, args.max_length, seed=0)
    n_rows = 8 * args.steps
    packed = [rows[i: i + 8] for i in range(0, n_rows, 8)]
    # grouped: the same examples (those of the packed steps), batch_size rows of similar length each
    examples = [e for step in packed for row in step for e in batching.examples_of(row)]
    sampler = batching.LengthGroupedBatches([len(e["input_ids"]) for e in examples], 8, seed=0)
    ways = {"packed rows (block mask)": [batching.collate_packed(tokenizer)(s) for s in packed],
            "packed chunks": [batching.examples_batch(tokenizer, 8)(s) for s in packed],
            "grouped (no packing)": [batching.examples_batch(tokenizer, 8)(_as_rows([examples[i] for i in b]))
                                     for b in sampler]}
    timings = {name: [] for name in ways}
    step(model, ways["packed chunks"][0])  # warm-up: first-call allocations and kernel selection
    for _round, name in itertools.product(range(2), ways):
        start, tokens = time.perf_counter(), 0
        for batch in ways[name]:
            tokens += int(batch["token_count"])
            step(model, batch)
        timings[name].append(tokens / (time.perf_counter() - start))
    print(f"\nSmolLM2-135M LoRA r8 q,v, {len(examples)} short BBC rows, max_length {args.max_length}, "
          f"{args.threads} threads (forward+backward, 2 alternated rounds, median)")
    base = statistics.median(timings["packed rows (block mask)"])
    for name, tps in timings.items():
        print(f"{name:28s} {statistics.median(tps):8.1f} tok/s  x{statistics.median(tps) / base:.2f} vs packed rows")


def _as_rows(examples):
    return [{"input_ids": e["input_ids"], "labels": e["labels"], "position_ids": list(range(len(e["input_ids"])))}
            for e in examples]


def step(model, batch) -> None:
    import contextlib

    from trainers.loop import forward_backward

    batch = {k: v for k, v in batch.items() if k not in ("token_count", "sequence_count")}
    forward_backward(model, batch, "cpu", contextlib.nullcontext(), torch.amp.GradScaler("cpu", enabled=False))
    model.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
