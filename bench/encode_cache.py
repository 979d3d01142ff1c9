"""What the tokenized-splits cache saves a trial, measured side by side in one run.

The whole BBC corpus as instruction rows (SmolLM2's chat template, answer masks from character offsets:
2,200 rows) is made ready three ways, alternated over rounds: encoded with the cache off, encoded and
written (the first trial of a sweep), and read back (every later trial on the machine). Prints the median
seconds of each and the ratios. Usage: python bench/encode_cache.py [--rounds 3] [--task bbc_headlines]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--task", default="bbc_headlines")
    args = ap.parse_args()
    from sweeps.config import load
    from trainers import data, encoded_cache, scoring
    from trainers.model import load_tokenizer

    cfg = load(["model=smollm2_135m", f"task={args.task}", "task.train_size=1900", "task.validation_size=100",
                "task.test_size=200"]).trial
    tokenizer = load_tokenizer(cfg)
    splits = data.load_splits(cfg.task)

    def ready() -> bool:
        start = time.perf_counter()
        encoded, _, hit = encoded_cache.encoded_splits(splits, tokenizer, cfg,
                                                       lambda f: scoring.encode_counted(f, tokenizer, cfg))
        sum(len(ids) for ds in encoded.values() for ids in ds["input_ids"])  # a trial reads every row
        return hit, time.perf_counter() - start

    times = {"cache off (encode)": [], "miss (encode + write)": [], "hit (read back)": []}
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as root:
            os.environ[encoded_cache.CACHE_DIR_ENV] = "off"
            times["cache off (encode)"].append(ready()[1])
            os.environ[encoded_cache.CACHE_DIR_ENV] = root
            hit, seconds = ready()
            assert not hit
            times["miss (encode + write)"].append(seconds)
            hit, seconds = ready()
            assert hit
            times["hit (read back)"].append(seconds)
    rows = sum(len(f) for f in splits.values())
    print(f"\n{rows} {args.task} rows, {cfg.model.name} tokenizer, {args.rounds} rounds (median seconds)")
    off = statistics.median(times["cache off (encode)"])
    for name, seconds in times.items():
        print(f"{name:24s} {statistics.median(seconds):7.2f} s   x{off / statistics.median(seconds):.1f} vs encoding")


if __name__ == "__main__":
    main()
