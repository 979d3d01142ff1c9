"""One trial, top to bottom: data → model (+ quantization) → method → train → evaluate → measure →
save → log. Runs the same with or without Ray; a caller passes only `report` (where intermediate results
go), the CPUs it granted, the arm label it planned and extra tags. How the trial ended becomes its run's
status in one place (the `TrialRun` context manager of trainers/trial_run.py)."""
from __future__ import annotations

import gc
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from trainers import batching, checkpoint, data, distributed, dropout, encoded_cache, loop, memory, quantization
from trainers import record, scoring
from trainers.config import TrialConfig, dump_trial_config, trial_config_to_dict
from trainers.device import pick_device
from trainers.methods import apply_method, parameter_counts, upcast_trainable
from trainers.metrics import preload as preload_metrics
from trainers.model import load_model, load_tokenizer, shape_of
from trainers.modules import resolve_target_modules, summarize
from trainers.tracking import StopTrial
from trainers.trial_run import TrialRun

# Receives intermediate and final results; raises StopTrial when a scheduler ends the trial early. At an
# evaluation that is also a checkpoint (train.checkpoint_every_steps) it is called as report(metrics,
# save_state), and save_state(folder) writes the checkpoint where the caller keeps them. On several workers every
# rank reports (Ray Train's report is collective); rank 0's metrics are the trial's.
Report = Callable[..., None]


def trial_params(cfg: TrialConfig) -> dict:
    m, t = cfg.method, cfg.train
    # a key the method does not read is left out, so the run never shows a knob that changed nothing
    method = {k: getattr(m, k) if m.reads(k) else None for k in ("r", "alpha", "dropout", "init_lora_weights")}
    return {
        "model": cfg.model.name, "model_path": cfg.model.path, "task": cfg.task.name, "method": m.name,
        "r": method["r"], "alpha": method["alpha"], "dropout": method["dropout"],
        "target_modules": m.target_modules if isinstance(m.target_modules, str) else ",".join(m.target_modules),
        "quantization": cfg.quant.mode, "double_quant": cfg.quant.double_quant,
        "compute_dtype": cfg.quant.compute_dtype, "lr": t.lr, "batch_size": t.batch_size,
        "grad_accum": t.grad_accum, "epochs": t.epochs, "max_steps": t.max_steps, "seed": t.seed,
        "train_size": cfg.task.train_size, "max_length": cfg.task.max_length,
        "sweep_id": cfg.tracking.sweep_id, "init_lora_weights": method["init_lora_weights"],
        "task_type": cfg.task.type, "task_format": cfg.task.format if cfg.task.type == "sft" else None,
        "packing": t.packing, "group_by_length": t.group_by_length and not t.packing,
        "fast_cpu_dropout": t.fast_cpu_dropout,
    }


def fault_hook_for(spec: Optional[str], batch_size: int = 0) -> Optional[Callable[[int], None]]:
    """`raise@N` / `oom@N` / `kill@N` (optionally `:bs>B`) from train.inject_fault: fail at optimizer step N,
    as a real fault would; with `:bs>B` only while the micro-batch is larger than B."""
    if not spec:
        return None
    kind, _, rest = spec.partition("@")
    at, _, cond = rest.partition(":bs>")
    if cond and batch_size <= int(cond):
        return None

    def hook(step: int) -> None:
        if step == int(at):
            if kind == "oom":
                raise torch.OutOfMemoryError(f"injected out-of-memory at step {step}")
            if kind == "kill":
                import signal

                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault at step {step}")
    return hook


def run_trial_with_oom_retries(cfg: TrialConfig, **kwargs) -> dict:
    """run_trial, and on out-of-memory again with half the micro-batch and twice the gradient accumulation:
    the same effective batch, so the retry answers the same question at less activation memory. An odd
    micro-batch cannot be halved exactly (15 → 7 x 2 is 14): the retry takes the largest micro-batch at most
    half as large that divides the effective batch (15 → 5 x 3), so the effective batch stays exact. Each
    attempt is recorded (`oom`, then the retry's outcome, tagged with the micro-batch x accumulation it
    replaced); the last OOM propagates, which Ray searchers treat as a failed (infeasible) trial rather than
    a bad score."""
    import dataclasses

    attempt = cfg
    # every attempt carries the requested configuration's key (and so its label), so --resume recognises a
    # retried success and the retry stays in its arm
    key = record.trial_key(trial_config_to_dict(cfg))
    kwargs["tags"] = {**(kwargs.get("tags") or {}), record.TRIAL_KEY: key}
    kwargs["arm"] = kwargs.get("arm") or record.standalone_arm(key)
    for retry in range(cfg.train.oom_retries + 1):
        if retry:  # the failed attempt's model is unreachable only now, outside its frame and traceback
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        try:
            return run_trial(attempt, **kwargs)
        except torch.OutOfMemoryError:
            if retry == cfg.train.oom_retries or attempt.train.batch_size == 1:
                raise
            batch, accum = attempt.train.batch_size, attempt.train.grad_accum
            # at most half: each retry cuts activation memory at least as much as halving would, so the
            # retries reach as small a micro-batch; 1 always divides, so the effective batch stays exact
            smaller = max(d for d in range(1, batch // 2 + 1) if batch * accum % d == 0)
            train = dataclasses.replace(attempt.train, batch_size=smaller, grad_accum=batch * accum // smaller)
            attempt = dataclasses.replace(attempt, train=train)
            print(f"out of memory at micro-batch {batch} x accumulation {accum}: retrying at {smaller} x "
                  f"{train.grad_accum} (effective batch {batch * accum})", flush=True)
            kwargs["tags"] = {**kwargs["tags"], record.OOM_RETRY: str(retry + 1),
                              f"{record.OOM_RETRY}_from": f"{batch}x{accum}"}
            # a checkpoint's data position counts micro-batches of the size that ran out of memory
            kwargs["resume_from"] = None
    raise AssertionError("unreachable")


def throughput(net, stats: dict, device: str, workers: int = 1) -> dict:
    """Model FLOPs per token (LoRA-aware: a frozen weight costs 4, a trained one 6), achieved TFLOP/s,
    and MFU against the device's dense peak for the precision trained in (CUDA only: CPUs have no
    agreed peak, so their MFU is left out rather than guessed)."""
    from trainers.flops import matmul_param_counts, mfu, peak_flops_for_device, transformer_flops_per_token

    frozen, trainable = matmul_param_counts(net)
    hidden, layers, _ = shape_of(net.config)
    seq = stats["tokens"] / max(1, stats["sequences"])
    per_token = transformer_flops_per_token(frozen, trainable, layers, int(round(seq)), hidden,
                                            full_finetune=frozen == 0)
    out = {record.FLOPS_PER_TOKEN: per_token, record.TRAIN_TFLOPS_PER_S: stats["tokens_per_s"] * per_token / 1e12}
    peak = peak_flops_for_device(memory.device_name(device), stats["precision"]) if device.startswith("cuda") else None
    if peak:
        # tokens/s is every worker's: their MFU is against every worker's device
        out[record.MFU] = mfu(stats["tokens_per_s"], per_token, peak * workers)
    return out


def _name_base_portably(adapter_dir: Path, cfg: TrialConfig) -> None:
    """peft records the folder the base was loaded from: for a packaged or cached model that is a path inside
    this machine's venv or cache, useless anywhere else. Name the base as the user did instead (a hub id, a
    `pkg://` reference, or their own path); a promoted version adds its content hash (base_model.json)."""
    import json

    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = cfg.model.path
    if cfg.model.revision:
        config["revision"] = cfg.model.revision
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1024 ** 2


def run_trial(cfg: TrialConfig, report: Optional[Report] = None, num_threads: Optional[int] = None,
              fault_hook: Optional[Callable[[int], None]] = None, tags: Optional[dict] = None,
              arm: Optional[str] = None, resume_from: Optional[str] = None) -> dict:
    """Run one configuration end to end and return its metrics (also logged to MLflow when enabled).
    `arm`: the label a sweep planned for this configuration (its report groups runs by it); a trial run on
    its own is labelled by its trial key. `tags` are extra run tags (the sweep adds where Ray placed it).
    `resume_from`: a checkpoint folder; the trial continues from it, in the MLflow run it was writing.
    Inside a torch.distributed group (Ray Train's workers, torchrun) every rank runs this; rank 0 records."""
    import dataclasses

    wall_start = time.perf_counter()
    threads = cfg.train.num_threads or num_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)  # a 1-CPU Ray trial must not fight its neighbour for cores
    device = pick_device(cfg.train.device)
    distributed.join_from_env(device)
    rank, workers = distributed.world()
    device = distributed.device_for_rank(device)
    strategy = distributed.choose_strategy(cfg.train.strategy, not cfg.method.is_adapter) if workers > 1 else "single"
    if isinstance(cfg.train.workers, int) and cfg.train.workers != workers:
        print(f"train.workers={cfg.train.workers}, but this process group has {workers}: training on {workers} "
              f"(start workers with `torchrun --nproc_per_node {cfg.train.workers} -m trainers ...` or a sweep)",
              flush=True)
    key = record.trial_key(trial_config_to_dict(cfg))
    arm = arm or record.standalone_arm(key)
    metric_name = record.metric_key("val", cfg.task.metric)
    tracked = cfg.tracking if rank == 0 else dataclasses.replace(cfg.tracking, enabled=False)
    if resume_from is None and fault_hook is None:  # a drill fires once: not again in the run it restarted
        fault_hook = fault_hook_for(cfg.train.inject_fault, cfg.train.batch_size)
    try:
        with TrialRun(tracked, run_name=f"{arm}-s{cfg.train.seed}", params=trial_params(cfg),
                      tags={record.ARM: arm, record.DEVICE: memory.device_name(device), record.TRIAL_KEY: key,
                            **(tags or {})},
                      resume_run_id=checkpoint.run_id_of(resume_from) if resume_from else None) as run:
            torch.manual_seed(cfg.train.seed)

            # 1. data: the label set fixes the classifier head
            splits = data.load_splits(cfg.task)
            tokenizer = load_tokenizer(cfg)

            # 2. base model, quantized or not; activation checkpointing trades step time for memory. Host
            # memory from here on is what the method controls, so the libraries later steps would load on
            # first use come in first (peft alone is ~200 MB of RSS, the metric modules ~45 MB).
            import peft  # noqa: F401

            preload_metrics(generation=cfg.task.type == "sft")
            memory.release_cached(device)  # an earlier trial of this process (reuse_actors) leaves none behind
            rss_baseline = memory.reset_host_peak()
            net = load_model(cfg, len(cfg.task.labels), tokenizer, device)
            net = quantization.prepare_for_training(net, cfg.quant)
            if cfg.train.gradient_checkpointing:
                # non-reentrant: works with a frozen base, no need to make the inputs require grad
                net.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                if hasattr(net.config, "use_cache"):
                    net.config.use_cache = False

            # 3. method: adapters on resolved modules, or every weight for full fine-tuning
            targets = resolve_target_modules(net, cfg.method.target_modules) if cfg.method.is_adapter else []
            net = apply_method(net, cfg.method, targets, cfg.task.type)
            upcast_trainable(net)
            cpu_dropouts = 0
            if device == "cpu":
                quantization.patch_cpu_layers(net)
                if cfg.train.fast_cpu_dropout:  # a quarter of a MiniLM step went to drawing dropout masks
                    cpu_dropouts = dropout.use_cpu_dropout(net)
            trainable, total = parameter_counts(net)
            trained = distributed.wrap(net, strategy, device)  # what steps call: DDP, FSDP2 shards, or net
            # from here the heap's peak is what training and evaluation add to the weights; the weights are
            # counted by their bytes, since a checkpoint transformers maps from disk is not on the heap
            memory.start_heap_window()
            run.log_params({"target_modules_resolved": summarize(targets) or "all",
                            "n_target_modules": len(targets), "num_threads": torch.get_num_threads(),
                            "precision": cfg.train.precision,
                            "gradient_checkpointing": cfg.train.gradient_checkpointing,
                            "attn_implementation": getattr(net.config, "_attn_implementation", None),
                            "cpu_dropout_modules": cpu_dropouts, record.WORKERS: workers,
                            record.STRATEGY: strategy})

            # 4. tokenize, as scoring reads each split (sft drops a row whose answer alone is too long), or read
            # the splits a trial before this one on this machine tokenized the same way
            encoded, dropped, from_cache = encoded_cache.encoded_splits(
                splits, tokenizer, cfg, lambda frame: scoring.encode_counted(frame, tokenizer, cfg))
            if not len(encoded["train"]):
                raise ValueError(f"every training row's answer exceeds task.max_length={cfg.task.max_length}")
            # shuffled, grouped or packed; on N workers each computes its 1/N of every micro-batch
            train_loader = batching.train_loader(encoded["train"], tokenizer, cfg,
                                                 getattr(net.config, "_attn_implementation", None))
            if workers > 1:
                train_loader = distributed.RankSlices(train_loader, rank, workers)
            run.ready()  # the run exists (its writer made it meanwhile) before any training is spent
            setup_time = time.perf_counter() - wall_start  # everything before the first step: where time goes

            # 5. train, with validation passes the scheduler can act on
            def on_eval(step: int, loss: float, save_state=None) -> None:
                # every rank scores (a sharded model's forward needs them all); the loss is the whole batch's
                loss = distributed.reduce({"loss": loss}, "mean")["loss"]
                scores = scoring.evaluate(net, encoded["validation"], tokenizer, cfg, device, "val")
                run.log_metrics({**scores, record.TRAIN_LOSS: loss}, step=step)
                if report:
                    metrics = {**scores, record.TRAIN_LOSS: loss, record.STEP: step, "mlflow_run_id": run.run_id}
                    report(metrics, save_state) if save_state else report(metrics)

            memory.reset_cuda_peak(device)
            if rank:  # the weights are the same on every rank; the dropout masks must not be
                torch.manual_seed(cfg.train.seed + 7919 * rank)
            if cfg.method.trains:
                stats = loop.train(trained, train_loader, cfg.train, device, on_eval=on_eval, fault_hook=fault_hook,
                                   resume=resume_from, trainer_state={"mlflow_run_id": run.run_id})
                if stats["resumed_from_step"] is not None:
                    run.set_tags({record.RESUMED_FROM_STEP: stats["resumed_from_step"]})
            else:  # the base arm: scored as it is
                stats = loop.untrained(cfg.train, device)
            train_peaks = memory.cuda_peaks(device)
            driver_view = memory.nvml_process_gb(device)  # read before eval frees or grows the pool
            # the trial's speed is every worker's tokens; the loss is the whole batch's
            stats.update(distributed.reduce({"tokens_per_s": stats["tokens_per_s"]}, "sum"))
            stats.update(distributed.reduce({"train_loss": stats["train_loss"]}, "mean"))
            speed = throughput(net, stats, device, workers) if stats["tokens"] else {}

            # 6. evaluate: validation selects, test reports
            memory.reset_cuda_peak(device)
            eval_start = time.perf_counter()
            # each split's per-row record (record.ROW_SCORES_DIR) comes from these same predictions: no extra pass
            scores, rows = {}, {}
            for split, prefix in (("validation", "val"), ("test", "test")):
                split_scores, rows[prefix] = scoring.evaluate_rows(net, encoded[split], tokenizer, cfg, device, prefix)
                scores.update(split_scores)
            if cfg.task.type == "sft":  # what it writes: greedy generations, scored, the validation ones logged
                val_scores, table = scoring.generate_split(net, tokenizer, cfg, splits["validation"], device, "val")
                scores.update(val_scores)
                test_scores, test_table = scoring.generate_split(net, tokenizer, cfg, splits["test"], device, "test")
                scores.update(test_scores)
                run.log_table(table, record.GENERATIONS_TABLE)
                scores[record.SFT_ROWS_DROPPED] = dropped["train"]
                rows = {"val": table, "test": test_table}  # scored row by row at logging, outside eval time
            eval_time = time.perf_counter() - eval_start
            eval_peaks = memory.cuda_peaks(device)

            # 7. save what would ship: the adapter (or the whole model for full FT), as safetensors; the base
            # arm trained nothing and ships nothing
            adapter_mb = 0.0
            with tempfile.TemporaryDirectory() as tmp:
                ship_dir = Path(tmp) / (record.ADAPTER_DIR if cfg.method.is_adapter else "model")
                # FSDP2: every rank joins gathering the full weights; rank 0 writes them
                whole = distributed.full_state_dict(net) if strategy == "fsdp" and cfg.method.trains else None
                if cfg.method.trains and rank == 0:
                    net.save_pretrained(ship_dir, safe_serialization=True, **({"state_dict": whole} if whole else {}))
                    if cfg.method.is_adapter:
                        _name_base_portably(ship_dir, cfg)
                    dump_trial_config(cfg, str(ship_dir / record.TRIAL_CONFIG_FILE))
                    adapter_mb = _dir_mb(ship_dir)
                    if cfg.tracking.save_adapter:
                        run.log_artifacts(str(ship_dir), ship_dir.name)

            # 8. measure and log
            results = {
                **scores, record.TRAIN_LOSS: stats["train_loss"], record.STEP: stats["steps"],
                record.TRAIN_TIME_S: stats["train_time_s"], record.EVAL_TIME_S: eval_time,
                record.SETUP_TIME_S: setup_time, record.ENCODED_FROM_CACHE: float(from_cache),
                record.TOKENS_PER_S: stats["tokens_per_s"], **speed, record.TRAINABLE_PARAMS: trainable,
                record.TOTAL_PARAMS: total, record.TRAINABLE_PCT: 100.0 * trainable / total,
                record.ADAPTER_MB: adapter_mb, record.PEAK_HOST_RSS_GB: memory.trial_host_peak_gb(rss_baseline),
                record.PEAK_RSS_ABOVE_BASELINE_GB: (memory.host_peak_since_reset_gb() - rss_baseline
                                                    if rss_baseline is not None else None),
                record.PEAK_TENSOR_MEMORY_GB: memory.peak_tensor_memory_gb(net),
                **{k: max(train_peaks.get(k, 0), eval_peaks.get(k, 0)) for k in train_peaks}, **driver_view,
                **{f"train_{k}": v for k, v in train_peaks.items()},
                **{f"eval_{k}": v for k, v in eval_peaks.items()},
                record.WALL_TIME_S: time.perf_counter() - wall_start,
                record.PARAMETER_BYTES_PER_WORKER_GB: distributed.local_parameter_bytes(net) / 1024 ** 3,
            }
            # a trial on N workers needs each of them to hold its largest worker's memory: the max over ranks
            results.update(distributed.reduce({k: v for k, v in results.items() if k.endswith("_gb")}, "max"))
            # one score a row, keyed by stable row ids, and each split's hash of its ordered ids: the report pairs
            # arms row by row (evaluation/paired.py), and only runs whose hashes agree were scored on the same rows
            with tempfile.TemporaryDirectory() as tmp:
                for prefix, split in (("val", "validation"), ("test", "test")):
                    keyed = scoring.row_record(cfg, splits[split], rows[prefix])
                    run.log_params({record.row_ids_hash_param(prefix): record.row_ids_hash(keyed[record.ROW_ID])})
                    scoring.write_row_record(keyed, Path(tmp) / Path(record.row_scores_file(prefix)).name)
                run.log_artifacts(tmp, record.ROW_SCORES_DIR)
            run.log_metrics(results, step=stats["steps"])
            # read before `ok` is recorded: a trial without the metric it is ranked by must fail in its run,
            # not after it (the sweep would count it errored while its run said ok)
            ranked = scores[metric_name]
            run.finish("ok")
            results.update({"status": "ok", "mlflow_run_id": run.run_id, "arm": arm})
            if report:
                try:
                    report({**results, metric_name: ranked})
                except StopTrial:
                    pass  # a stop at the final report (ASHA at max_t) comes after the trial finished: still ok
            return results
        # reached only when the scheduler stopped the trial: its run recorded `pruned`
        return {"status": "pruned", "mlflow_run_id": run.run_id, "arm": arm}
    finally:
        if device.startswith("cuda"):  # hand the cached blocks the trial freed back to the GPU's other users
            torch.cuda.empty_cache()
