"""A peftsweep trial against the peers, side by side in one run: the same configuration run by
`python -m trainers` and by the script a user of the peer would write (bench/peer_scripts/), alternated;
medians.

  classification: MiniLM LoRA r8 q,v on Rotten Tomatoes (1,000 training rows, validation 500, test 2,000,
                  adapter saved) vs HF Trainer + PEFT
  sft:            SmolLM2-135M LoRA r8 q,v on BBC headlines (alpaca, completion-only loss) vs TRL's
                  SFTTrainer + PEFT, packing off and on

Prints wall time, train tokens/s and the validation metric of each, and every ratio to peftsweep's. Needs
the bench extra (TRL): `make bench-peers`. Usage: python bench/peers.py [--pairs 3] [--sft-pairs 1]
[--only classification|sft] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLASSIFICATION = ["task.train_size=1000", "task.validation_size=500", "task.test_size=2000",
                  "method.target_modules=[query,value]"]
SFT = ["model=smollm2_135m", "task=bbc_headlines", "task.train_size=96", "task.validation_size=32",
       "task.test_size=8", "task.generation_rows=4", "task.max_new_tokens=8", "train.batch_size=8",
       "method.target_modules=[q_proj,v_proj]"]


def _last_json(out: str) -> dict:
    return json.loads([line for line in out.strip().splitlines() if line.startswith("{")][-1])


def ours(overrides: list[str], threads: int, tmp: str, tag: str) -> dict:
    """One `python -m trainers` trial from the resolved config (Hydra composes it here, not in the trial)."""
    from sweeps.config import load
    from trainers.config import dump_trial_config

    cfg = load(overrides).trial
    cfg.train.num_threads = threads
    cfg.tracking.uri, cfg.tracking.artifact_location = f"sqlite:///{tmp}/{tag}.db", f"{tmp}/{tag}-artifacts"
    path = f"{tmp}/{tag}.yaml"
    dump_trial_config(cfg, path)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "trainers", "--config", path, "--json"], capture_output=True,
                          text=True, check=True)
    result = _last_json(proc.stdout)
    metric = f"val_{cfg.task.metric}" if cfg.task.type != "sft" else "val_loss"
    return {"wall_s": time.perf_counter() - start, "train_s": result["train_time_s"],
            "train_tokens_per_s": result["tokens_per_s"], metric: result[metric]}


def peer(script: str, args: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / "peer_scripts" / script), *args], capture_output=True,
                          text=True)
    if proc.returncode:
        raise RuntimeError(f"{script} failed:\n{proc.stderr[-3000:]}")
    return {**_last_json(proc.stdout), "wall_s": time.perf_counter() - start}


def classification_rows(tmp: str) -> tuple[str, str]:
    from sweeps.config import load
    from trainers import data
    from trainers.assets import resolve

    cfg = load(CLASSIFICATION).trial
    splits = data.load_splits(cfg.task)
    path = f"{tmp}/classification.json"
    Path(path).write_text(json.dumps({k: {"text": list(v["text"]), "label": [int(x) for x in v["label"]]}
                                      for k, v in splits.items()}))
    return resolve(cfg.model.path), path


def sft_rows(tmp: str) -> tuple[str, str]:
    from sweeps.config import load
    from trainers import data
    from trainers.model import model_dir

    cfg = load(SFT).trial
    splits = data.load_splits(cfg.task)
    path = f"{tmp}/sft.json"
    Path(path).write_text(json.dumps({k: {"prompt": list(v["prompt"]), "completion": list(v["reference"])}
                                      for k, v in splits.items() if k != "test"}))
    return model_dir(cfg)[0], path


def table(title: str, results: dict, metric: str, base: str) -> None:
    print(f"\n{title} (medians; ratios are peftsweep / peer for time, peer / peftsweep for tokens/s)")
    print(f"{'runner':34s} {'n':>2s} {'wall s':>8s} {'train s':>8s} {'train tok/s':>12s} {metric:>13s} "
          f"{'wall ratio':>10s} {'tok/s ratio':>11s}")
    med = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    for name, m in med.items():
        wall = med[base]["wall_s"] / m["wall_s"] if name != base else 1.0
        tok = med[base]["train_tokens_per_s"] / m["train_tokens_per_s"] if name != base else 1.0
        print(f"{name:34s} {len(results[name]):2d} {m['wall_s']:8.1f} {m['train_s']:8.1f} "
              f"{m['train_tokens_per_s']:12.1f} {m[metric]:13.4f} {wall:10.3f} {tok:11.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3, help="alternated classification pairs")
    ap.add_argument("--sft-pairs", type=int, default=1, help="alternated rounds of the four sft runs")
    ap.add_argument("--only", choices=["classification", "sft"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    t = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "sft":
            model, rows = classification_rows(tmp)
            results = {"peftsweep (python -m trainers)": [], "HF Trainer + PEFT": []}
            for i in range(args.pairs):  # alternate who goes first: machine noise spreads over both
                for name in (list(results) if i % 2 == 0 else list(reversed(results))):
                    if name.startswith("peftsweep"):
                        results[name].append(ours(CLASSIFICATION, args.threads, tmp, f"c{i}"))
                    else:
                        results[name].append(peer("hf_trainer_classification.py", [model, rows, f"{tmp}/hf{i}", t]))
            table("classification: MiniLM LoRA r8 q,v, Rotten Tomatoes 1,000 rows", results, "val_accuracy",
                  "peftsweep (python -m trainers)")
        if args.only != "classification":
            from sweeps.config import load

            model, rows = sft_rows(tmp)
            max_length = str(load(SFT).trial.task.max_length)  # TRL cuts rows to the length ours does
            results = {"peftsweep": [], "peftsweep packing": [], "TRL SFTTrainer": [],
                       "TRL SFTTrainer packing": []}
            for i in range(args.sft_pairs):
                names = list(results) if i % 2 == 0 else list(reversed(results))
                for name in names:
                    packing = name.endswith("packing")
                    if name.startswith("peftsweep"):
                        results[name].append(ours(SFT + [f"train.packing={str(packing).lower()}"], args.threads, tmp,
                                                  f"s{i}{int(packing)}"))
                    else:
                        results[name].append(peer("trl_sft.py", [model, rows, f"{tmp}/trl{i}{int(packing)}", t,
                                                                 str(int(packing)), max_length]))
            table("sft: SmolLM2-135M LoRA r8 q,v, BBC headlines 96 rows", results, "val_loss", "peftsweep")
            packed = {k: statistics.median(r["train_tokens_per_s"] for r in v) for k, v in results.items()}
            print(f"\npeftsweep packing vs TRL packing, train tokens/s: "
                  f"{packed['peftsweep packing'] / packed['TRL SFTTrainer packing']:.3f}x")


if __name__ == "__main__":
    main()
