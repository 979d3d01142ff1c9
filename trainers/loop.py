"""A plain PyTorch training loop (no Trainer: the loop is the recipe); scoring lives in trainers/scoring.py."""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch

from trainers.config import TrainConfig
from trainers.memory import sample_heap


def total_steps(num_batches: int, train: TrainConfig) -> int:
    """Optimizer steps `train` takes: an epoch's last step takes what is left of it (a step never spans two
    epochs), so an epoch is ceil(num_batches / grad_accum) steps; the epsilon keeps float noise in a fractional
    `epochs` (0.1 x 30 = 3.0000000000000004) from adding a step."""
    per_epoch = math.ceil(num_batches / train.grad_accum)
    steps = max(1, math.ceil(train.epochs * per_epoch - 1e-9))
    return min(steps, train.max_steps) if train.max_steps else steps


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def train(model, loader, train_cfg: TrainConfig, device: str,
          on_eval: Optional[Callable[[int, float, Optional[Callable[[str], None]]], None]] = None,
          fault_hook: Optional[Callable[[int], None]] = None, resume: Optional[str] = None,
          trainer_state: Optional[dict] = None) -> dict:
    """Train for `total_steps` optimizer steps; call `on_eval(step, mean_loss)` every eval_every_steps, and
    `on_eval(step, mean_loss, save_state)` at every checkpoint_every_steps, where `save_state(folder)` writes a
    checkpoint (trainers/checkpoint.py). `resume`: a checkpoint folder to continue from (weights,
    optimizer, schedule, RNG and data position restored: the run ends where an uninterrupted one ends).
    `trainer_state`: extra entries a checkpoint carries (the MLflow run id). Returns loss and timing figures;
    tokens counts non-padding tokens seen."""
    from trainers import checkpoint
    from trainers.distributed import world

    rank = world()[0]
    params = [p for p in model.parameters() if p.requires_grad]
    # One process: the fused kernel updates every tensor in one pass; on CPU a full-FT step of MiniLM's 22 M
    # weights took 0.074 s unfused and 0.010 s fused (1 thread). Sharded (DTensor) weights keep the default.
    fused = world()[1] == 1 and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, fused=fused or None)
    steps = total_steps(len(loader), train_cfg)
    warmup = int(steps * train_cfg.warmup_ratio)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    dtype = autocast_dtype(device, train_cfg.precision)
    autocast = autocast_for(device, train_cfg.precision)
    # fp16 underflows small gradients: scale the loss up, unscale before clipping
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    model.train()
    step, tokens, sequences, losses, window = 0, 0, 0, [], []
    epoch, skip, resumed_from = 0, 0, None
    if resume:
        state, rng = checkpoint.load(resume, model, optimizer, rank)
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, skip, losses = state["step"], state["epoch"], state["micro"], list(state["losses"])
        tokens, sequences, resumed_from = state["tokens"], state["sequences"], state["step"]
    check_grads = True  # at the first step and after every evaluation pass
    started, tokens_before = time.perf_counter(), tokens
    for _ in range(epoch):  # the loader's seeded order, replayed: each epoch reshuffles from the last
        for _ in loader:
            pass
    while step < steps:
        num_micro = len(loader)
        for micro, batch in enumerate(loader):
            if skip:  # micro-batches of this epoch the checkpoint's steps already took (collated, not computed)
                skip -= 1
                if not skip:
                    checkpoint.set_rng_state(rng)  # dropout masks from here on as the first run drew them
                continue
            # the micro-batches this one's step sums: grad_accum, or what is left at the epoch's end (its
            # gradients and losses are not carried into the next epoch's first step)
            in_step = min(train_cfg.grad_accum, num_micro - micro // train_cfg.grad_accum * train_cfg.grad_accum)
            if fault_hook is not None:
                fault_hook(step)
            counted = {k: batch.pop(k) for k in ("token_count", "sequence_count") if k in batch}
            if counted:
                tokens += int(counted["token_count"])
                sequences += int(counted["sequence_count"])
            else:
                tokens += int(batch["attention_mask"].sum())
                sequences += int(batch["attention_mask"].shape[0])
            window.append(forward_backward(model, batch, device, autocast, scaler, in_step))
            if (micro + 1) % train_cfg.grad_accum and micro + 1 < num_micro:
                continue
            if check_grads:
                _assert_gradients(model)
                check_grads = False
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm)
            scaler.step(optimizer)
            sample_heap()
            scaler.update()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.extend(window)
            if on_eval and train_cfg.eval_every_steps and step % train_cfg.eval_every_steps == 0 and step < steps:
                save_state = None
                if train_cfg.checkpoint_every_steps and step % train_cfg.checkpoint_every_steps == 0:
                    at = {"step": step, "epoch": epoch, "micro": micro + 1, "losses": losses, "tokens": tokens,
                          "sequences": sequences, "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
                          **(trainer_state or {})}
                    rng = checkpoint.rng_state()  # before evaluation draws from it: what step + 1 trains with

                    def save_state(folder: str, at=at, rng=rng) -> None:
                        checkpoint.save(folder, model, optimizer, at, rng, rank)
                loss = sum(window) / len(window)
                on_eval(step, loss, save_state) if save_state else on_eval(step, loss)
                model.train()
                check_grads = True
            window = []
            if step >= steps:
                break
        epoch += 1
    elapsed = time.perf_counter() - started
    return {"train_loss": sum(losses) / max(1, len(losses)), "steps": step, "tokens": tokens,
            "resumed_from_step": resumed_from,
            "sequences": sequences, "train_time_s": elapsed,
            "tokens_per_s": (tokens - tokens_before) / elapsed if elapsed > 0 else 0.0,
            "precision": str(dtype).removeprefix("torch.") if dtype is not None else "float32"}


def forward_backward(model, batch: dict, device: str, autocast, scaler, grad_accum: int = 1) -> float:
    """Forward and backward of one micro-batch; returns its loss. `grad_accum`: the micro-batches its step
    sums, each loss scaled by its inverse so the step's gradient is their mean. A packed step computed as
    chunks (see trainers/batching.py) runs each chunk, its loss weighted by its share of the step's answer
    tokens."""
    total = 0.0
    for chunk in batch.get("chunks") or [batch]:
        weight = float(chunk.get("weight", 1.0))
        chunk = _to({k: v for k, v in chunk.items() if k not in ("prompt_len", "class_label", "weight")}, device)
        # a packed row has no attention mask (position ids delimit its examples) and must not build a
        # generation cache, or the model would ignore the example boundaries
        extra = {"use_cache": False} if "position_ids" in chunk else {}
        with autocast:
            loss = model(**chunk, **extra).loss
        sample_heap()
        scaler.scale(loss * (weight / grad_accum)).backward()
        sample_heap()
        total += loss.item() * weight
    return total


def untrained(train_cfg: TrainConfig, device: str) -> dict:
    """The figures `train` returns, for a model scored without training (the base arm)."""
    dtype = autocast_dtype(device, train_cfg.precision)
    return {"train_loss": None, "steps": 0, "tokens": 0, "sequences": 0, "train_time_s": 0.0, "tokens_per_s": 0.0,
            "precision": str(dtype).removeprefix("torch.") if dtype is not None else "float32"}


def autocast_for(device: str, precision: str):
    """The autocast context training used; evaluation and serving use it too, since a bf16 base with fp32
    adapters and head only composes under autocast."""
    dtype = autocast_dtype(device, precision)
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=dtype, enabled=dtype is not None)


def autocast_dtype(device: str, precision: str):
    """The autocast dtype for `train.precision` on `device`; None means plain fp32."""
    if not device.startswith("cuda") or precision == "fp32":
        return None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def _assert_gradients(model) -> None:
    """A trainable weight without a gradient after backward trains nothing, silently (bitsandbytes 4-bit
    on CPU after an eval pass did exactly that): fail loudly instead."""
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise RuntimeError(f"{len(missing)} trainable parameters got no gradient (first: {missing[0]}); "
                           "training would silently do nothing")
