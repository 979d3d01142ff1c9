"""A plain PyTorch training loop and the evaluation passes (no Trainer: the loop is the recipe)."""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch

from trainers.config import TrainConfig


class StopTrial(Exception):
    """Raised by a report callback when the scheduler stops the trial early (pruned)."""

    def __init__(self, step: int):
        super().__init__(f"stopped by the scheduler at step {step}")
        self.step = step


def total_steps(num_batches: int, train: TrainConfig) -> int:
    steps = max(1, math.ceil(num_batches * train.epochs / train.grad_accum))
    return min(steps, train.max_steps) if train.max_steps else steps


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def train(model, loader, train_cfg: TrainConfig, device: str,
          on_eval: Optional[Callable[[int, float], None]] = None,
          fault_hook: Optional[Callable[[int], None]] = None) -> dict:
    """Train for `total_steps` optimizer steps; call `on_eval(step, mean_loss)` every eval_every_steps.
    Returns loss and timing figures; tokens counts non-padding tokens seen."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
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
    check_grads = True  # at the first step and after every evaluation pass
    started = time.perf_counter()
    while step < steps:
        for micro, batch in enumerate(loader):
            if fault_hook is not None:
                fault_hook(step)
            batch = _to({k: v for k, v in batch.items() if k not in ("prompt_len", "class_label")}, device)
            with autocast:
                loss = model(**batch).loss / train_cfg.grad_accum
            scaler.scale(loss).backward()
            tokens += int(batch["attention_mask"].sum())
            sequences += int(batch["attention_mask"].shape[0])
            window.append(loss.item() * train_cfg.grad_accum)
            if (micro + 1) % train_cfg.grad_accum:
                continue
            if check_grads:
                _assert_gradients(model)
                check_grads = False
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.extend(window)
            if on_eval and train_cfg.eval_every_steps and step % train_cfg.eval_every_steps == 0 and step < steps:
                on_eval(step, sum(window) / len(window))
                model.train()
                check_grads = True
            window = []
            if step >= steps:
                break
    elapsed = time.perf_counter() - started
    return {"train_loss": sum(losses) / max(1, len(losses)), "steps": step, "tokens": tokens,
            "sequences": sequences, "train_time_s": elapsed, "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
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


@torch.no_grad()
def predict_classification(model, loader, device: str) -> tuple[list[int], list[int], float]:
    """Predicted and true class indices, and the mean cross-entropy (a continuous signal for schedulers:
    accuracy on a small validation set ties often)."""
    model.eval()
    preds, refs, loss_sum = [], [], 0.0
    for batch in loader:
        labels = batch.pop("labels")
        logits = model(**_to(batch, device)).logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, labels.to(device), reduction="sum").item()
        preds += logits.argmax(-1).tolist()
        refs += labels.tolist()
    return preds, refs, loss_sum / max(1, len(refs))


@torch.no_grad()
def predict_by_likelihood(model, rows, tokenizer, labels: list[str], device: str,
                          batch_size: int) -> tuple[list[int], list[int], float]:
    """Causal LM: predict the label whose answer tokens are most likely after the prompt; also the mean
    loss of the true answers (validation loss; exp of it is the answer perplexity).

    Sequences are left-padded so every answer ends at the last position, and only the last
    (longest answer + 1) positions get logits: the full [batch x labels, seq, vocab] fp32 logits of a
    large-vocabulary model would be the biggest tensor of the whole evaluation."""
    model.eval()
    eos = tokenizer.eos_token or ""
    answers = [tokenizer(" " + lab + eos, add_special_tokens=False)["input_ids"] for lab in labels]
    keep = max(map(len, answers)) + 1
    preds, refs, true_nll, true_tokens = [], [], 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        seqs = [row["input_ids"][: row["prompt_len"]] + ans for row in chunk for ans in answers]
        width = max(map(len, seqs))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(s)) + s for s in seqs], device=device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift the real tokens' positions
        try:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        except TypeError:  # an architecture without logits_to_keep: compute all, keep the tail
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        logprobs = torch.log_softmax(logits[:, -keep:].float(), -1)
        scores = []
        for i, ans in enumerate(answers * len(chunk)):
            n = len(ans)
            # the logit at kept index k predicts the token after it: answer token j sits at keep - n + j
            target = ids[i, width - n:]
            scores.append(logprobs[i, keep - n - 1: keep - 1].gather(-1, target[:, None]).sum().item())
        for j, row in enumerate(chunk):
            per_label = scores[j * len(labels): (j + 1) * len(labels)]
            preds.append(max(range(len(labels)), key=per_label.__getitem__))
            refs.append(row["class_label"])
            true_nll -= per_label[row["class_label"]]
            true_tokens += len(answers[row["class_label"]])
    return preds, refs, true_nll / max(1, true_tokens)
