"""A peftsweep trial against the peers, side by side in one run: the same configuration run by
`python -m trainers` and by the script a user of the peer would write (bench/peer_scripts/), alternated;
medians.

  classification: MiniLM LoRA r8 q,v on Rotten Tomatoes (1,000 training rows, validation 500, test 2,000,
                  adapter saved) vs HF Trainer + PEFT as written by default, and with its group_by_length
                  (peftsweep groups by length by default: the second row shows what that default is worth)
  sft:            SmolLM2-135M LoRA r8 q,v on BBC headlines (alpaca, completion-only loss) vs TRL's
                  SFTTrainer + PEFT, packing off and on; once with the articles cut at 400 characters
                  (~140-token rows, max_length 160: nothing to pack) and once at 100 characters with
                  max_length 512 (~60-token rows: packing has rows to fill)

Prints wall time, train tokens/s and the validation metric of each, and every ratio to peftsweep's. The sft
validation loss is each runner's own figure (TRL's is a mean of batch means, ours token-weighted) and, in
`val_loss_1`, every runner's saved adapter scored by one scorer (peftsweep's answer loss), so that column
compares models, not definitions. peftsweep's trials log into one MLflow store created before the timing
starts (a user's store exists once per project; creating it costs ~1.3 s). Needs the bench extra (TRL):
`make bench-peers`. Usage: python bench/peers.py [--pairs 3] [--sft-pairs 1] [--only classification|sft]
[--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
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
# short rows, room to pack: ~8 examples fill a 512-token row, so a packed step sees ~8x the examples
SFT_SHORT = SFT[:2] + ["task.train_size=256", "task.validation_size=32", "task.test_size=8",
                       "task.input_max_chars=100", "task.max_length=512"] + SFT[5:]


def _last_json(out: str) -> dict:
    return json.loads([line for line in out.strip().splitlines() if line.startswith("{")][-1])


def create_store(tmp: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{tmp}/mlflow.db").search_experiments()


def ours(overrides: list[str], threads: int, tmp: str, tag: str) -> dict:
    """One `python -m trainers` trial from the resolved config (Hydra composes it here, not in the trial)."""
    from sweeps.config import load
    from trainers.config import dump_trial_config

    cfg = load(overrides).trial
    cfg.train.num_threads = threads
    cfg.tracking.uri, cfg.tracking.artifact_location = f"sqlite:///{tmp}/mlflow.db", f"{tmp}/artifacts"
    path = f"{tmp}/{tag}.yaml"
    dump_trial_config(cfg, path)
    start = time.perf_counter()
    # a cold tokenized-splits cache: what one trial costs alone (bench/encode_cache.py measures a warm one)
    env = {**os.environ, "PEFTSWEEP_CACHE_DIR": tempfile.mkdtemp(dir=tmp)}
    proc = subprocess.run([sys.executable, "-m", "trainers", "--config", path, "--json"], capture_output=True,
                          text=True, check=True, env=env)
    result = _last_json(proc.stdout)
    metric = f"val_{cfg.task.metric}" if cfg.task.type != "sft" else "val_loss"
    out = {"wall_s": time.perf_counter() - start, "train_s": result["train_time_s"],
           "train_tokens_per_s": result["tokens_per_s"], metric: result[metric]}
    if cfg.task.type == "sft":
        adapter = next(Path(f"{tmp}/artifacts").rglob(f"{result['mlflow_run_id']}/artifacts/adapter"))
        out["val_loss_1"] = common_val_loss(str(adapter), None, overrides)
    return out


def common_val_loss(weights_dir: str, peer_adapter: str | None, overrides: list[str]) -> float:
    """Validation answer loss by peftsweep's scorer: of a peftsweep adapter folder, or of a peer's adapter
    put on the same base (`peer_adapter`)."""
    import torch
    from peft import PeftModel

    from sweeps.config import load
    from trainers import load_trained, scoring
    from trainers.model import load_model, load_tokenizer

    torch.manual_seed(0)
    if peer_adapter is None:
        model, tokenizer, cfg = load_trained(weights_dir, device="cpu")
    else:
        cfg = load(overrides).trial
        tokenizer = load_tokenizer(cfg)
        model = PeftModel.from_pretrained(load_model(cfg, 0, tokenizer, "cpu"), peer_adapter).eval()
    frame = scoring.data.load_splits(cfg.task)["validation"]
    return scoring.evaluate(model, scoring.encode(frame, tokenizer, cfg), tokenizer, cfg, "cpu", "val")["val_loss"]


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


def sft_rows(tmp: str, overrides: list[str], tag: str) -> tuple[str, str]:
    from sweeps.config import load
    from trainers import data
    from trainers.model import model_dir

    cfg = load(overrides).trial
    splits = data.load_splits(cfg.task)
    path = f"{tmp}/{tag}.json"
    Path(path).write_text(json.dumps({k: {"prompt": list(v["prompt"]), "completion": list(v["reference"])}
                                      for k, v in splits.items() if k != "test"}))
    return model_dir(cfg)[0], path


def table(title: str, results: dict, metrics: list[str], base: str) -> None:
    print(f"\n{title} (medians; both ratios are the first row / this row: wall < 1 and tok/s > 1 mean the first is faster)")
    print(f"{'runner':34s} {'n':>2s} {'wall s':>8s} {'train s':>8s} {'train tok/s':>12s} "
          + "".join(f"{m:>13s} " for m in metrics) + f"{'wall ratio':>10s} {'tok/s ratio':>11s}")
    med = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    for name, m in med.items():
        wall = med[base]["wall_s"] / m["wall_s"] if name != base else 1.0
        tok = med[base]["train_tokens_per_s"] / m["train_tokens_per_s"] if name != base else 1.0
        print(f"{name:34s} {len(results[name]):2d} {m['wall_s']:8.1f} {m['train_s']:8.1f} "
              f"{m['train_tokens_per_s']:12.1f} " + "".join(f"{m[k]:13.4f} " for k in metrics)
              + f"{wall:10.3f} {tok:11.3f}")


def classification(args, tmp: str) -> None:
    model, rows = classification_rows(tmp)
    t = str(args.threads)
    results = {"peftsweep (python -m trainers)": [], "HF Trainer + PEFT": [], "HF Trainer + PEFT, group_by_length": []}
    for i in range(args.pairs):  # alternate who goes first: machine noise spreads over both
        for name in (list(results) if i % 2 == 0 else list(reversed(results))):
            if name.startswith("peftsweep"):
                results[name].append(ours(CLASSIFICATION, args.threads, tmp, f"c{i}"))
            else:
                grouped = str(int(name.endswith("group_by_length")))
                results[name].append(peer("hf_trainer_classification.py", [model, rows, f"{tmp}/hf{i}", t, grouped]))
    table("classification: MiniLM LoRA r8 q,v, Rotten Tomatoes 1,000 rows", results, ["val_accuracy"],
          "peftsweep (python -m trainers)")


def sft(args, tmp: str, overrides: list[str], title: str, tag: str) -> None:
    from sweeps.config import load

    model, rows = sft_rows(tmp, overrides, tag)
    max_length = str(load(overrides).trial.task.max_length)  # TRL cuts rows to the length ours does
    results = {"peftsweep": [], "peftsweep packing": [], "TRL SFTTrainer": [], "TRL SFTTrainer packing": []}
    for i in range(args.sft_pairs):
        for name in (list(results) if i % 2 == 0 else list(reversed(results))):
            packing = name.endswith("packing")
            if name.startswith("peftsweep"):
                results[name].append(ours(overrides + [f"train.packing={str(packing).lower()}"], args.threads, tmp,
                                          f"{tag}{i}{int(packing)}"))
            else:
                out_dir = f"{tmp}/trl{tag}{i}{int(packing)}"
                run = peer("trl_sft.py", [model, rows, out_dir, str(args.threads), str(int(packing)), max_length])
                run["val_loss_1"] = common_val_loss("", f"{out_dir}/adapter", overrides)
                results[name].append(run)
    table(title, results, ["val_loss", "val_loss_1"], "peftsweep")
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("train_tokens_per_s", "val_loss_1")}
           for k, v in results.items()}
    ours_p, trl_p = med["peftsweep packing"], med["TRL SFTTrainer packing"]
    print(f"peftsweep packing vs TRL packing: train tokens/s {ours_p['train_tokens_per_s'] / trl_p['train_tokens_per_s']:.3f}x, "
          f"val_loss_1 {100 * (ours_p['val_loss_1'] / trl_p['val_loss_1'] - 1):+.1f} %")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3, help="alternated classification rounds")
    ap.add_argument("--sft-pairs", type=int, default=1, help="alternated rounds of the four runs of each sft case")
    ap.add_argument("--only", choices=["classification", "sft"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        create_store(tmp)
        if args.only != "sft":
            classification(args, tmp)
        if args.only != "classification":
            sft(args, tmp, SFT, "sft: SmolLM2-135M LoRA r8 q,v, BBC headlines 96 rows, max_length 160", "s")
            sft(args, tmp, SFT_SHORT, "sft, short rows: BBC headlines from 100 characters, 256 rows, max_length 512",
                "short")


if __name__ == "__main__":
    main()
