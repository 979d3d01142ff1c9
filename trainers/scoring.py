"""Scoring, written once: the trial's validation and test passes, the fresh-process reload check, serving
and merge damage all encode a split and predict through these functions, so they cannot drift apart.

Classification models predict by argmax of their head; a causal LM predicts the label whose answer tokens
are most likely after the task's prompt; an sft model is scored by the loss of its answers (every eval pass)
and by what it generates for the first `task.generation_rows` rows of a split (the end of a trial).
Metrics come from the local `evaluate` modules (trainers/metrics.py).
"""
from __future__ import annotations

import pandas as pd
import torch

from trainers import data, generation, loop, record, sft
from trainers.config import TrialConfig
from trainers.device import pick_device
from trainers.memory import sample_heap
from trainers.metrics import classification_metrics, generation_metrics


def encode(frame: pd.DataFrame, tokenizer, cfg: TrialConfig):
    """A split's frame as the model reads it, by task type."""
    return encode_counted(frame, tokenizer, cfg)[0]


def encode_counted(frame: pd.DataFrame, tokenizer, cfg: TrialConfig):
    """(encoded split, rows dropped): sft drops a row whose answer alone exceeds task.max_length."""
    if cfg.task.type == "classification":
        return data.tokenize_classification(frame, tokenizer, cfg.task.max_length), 0
    if cfg.task.type == "sft":
        return sft.tokenize(frame, tokenizer, cfg.task)
    return data.tokenize_sft(frame, tokenizer, cfg.task), 0


def eval_batch_size(cfg: TrialConfig) -> int:
    """sft scores in training-sized batches: generation's KV cache and the answers' logits grow with the
    batch, and training at that batch already fitted."""
    return cfg.train.batch_size if cfg.task.type == "sft" else cfg.train.eval_batch_size


def predict(model, encoded, tokenizer, cfg: TrialConfig, device: str,
            adapter_names: list[str] | None = None) -> tuple[list[int], list[int], float]:
    """(predicted class per row, in row order; true class per row; mean loss), under the training autocast:
    a bf16 base with fp32 adapters and head only composes there. `adapter_names`: one PEFT adapter per row,
    for a model holding several (trainers/adapters.py); each batch then runs mixed."""
    return predict_rows(model, encoded, tokenizer, cfg, device, adapter_names)[:3]


def predict_rows(model, encoded, tokenizer, cfg: TrialConfig, device: str,
                 adapter_names: list[str] | None = None) -> tuple[list[int], list[int], float, list[float]]:
    """`predict`, and each row's loss (its cross-entropy; a causal LM's per answer token of its true label)."""
    with loop.autocast_for(device, cfg.train.precision):
        if cfg.task.type == "classification":
            return _predict_classification(model, encoded, tokenizer, device, cfg.train.eval_batch_size,
                                           adapter_names)
        return _likelihood_rows(model, list(encoded), tokenizer, list(cfg.task.labels), device,
                                cfg.train.eval_batch_size, adapter_names)


def metrics(cfg: TrialConfig, predictions: list[int], references: list[int], loss: float | None = None) -> dict:
    """Task metrics by bare name (accuracy, macro_f1, loss; perplexity of the answers for a causal LM)."""
    out = classification_metrics(predictions, references, len(cfg.task.labels))
    if loss is not None:
        out["loss"] = loss
        if cfg.task.type != "classification":
            out["perplexity"] = float(torch.exp(torch.tensor(loss)))
    return out


def evaluate(model, encoded, tokenizer, cfg: TrialConfig, device: str, prefix: str) -> dict:
    """Task metrics of one encoded split as MLflow names them ({`<prefix>_accuracy`: ..., ...}); for sft the
    answers' loss and perplexity (generation is scored by `generate_split`)."""
    if cfg.task.type == "sft":
        with loop.autocast_for(device, cfg.train.precision):
            loss = generation.answer_loss(model, encoded, tokenizer, eval_batch_size(cfg), device)
        return {record.metric_key(prefix, "loss"): loss,
                record.metric_key(prefix, "perplexity"): float(torch.exp(torch.tensor(min(loss, 50.0))))}
    preds, refs, loss = predict(model, encoded, tokenizer, cfg, device)
    return {record.metric_key(prefix, k): v for k, v in metrics(cfg, preds, refs, loss).items()}


def evaluate_rows(model, encoded, tokenizer, cfg: TrialConfig, device: str,
                  prefix: str) -> tuple[dict, pd.DataFrame | None]:
    """`evaluate`, and from the same predictions one row per encoded row, in split order (the columns of
    trainers/record.py ROW_SCORE: score, prediction, label, loss): the final passes' per-row record, at no
    extra forward pass. sft: no rows here (its rows come from its generations: `generation_rows`)."""
    if cfg.task.type == "sft":
        return evaluate(model, encoded, tokenizer, cfg, device, prefix), None
    preds, refs, loss, row_losses = predict_rows(model, encoded, tokenizer, cfg, device)
    labels = list(cfg.task.labels)
    rows = pd.DataFrame({record.ROW_SCORE: [float(p == r) for p, r in zip(preds, refs)],
                         "prediction": [labels[p] for p in preds], "label": [labels[r] for r in refs],
                         "loss": row_losses})
    return {record.metric_key(prefix, k): v for k, v in metrics(cfg, preds, refs, loss).items()}, rows


def generate_split(model, tokenizer, cfg: TrialConfig, frame: pd.DataFrame, device: str,
                   prefix: str) -> tuple[dict, pd.DataFrame]:
    """sft: greedy generations for the first `task.generation_rows` rows of a split, their metrics
    (`<prefix>_rougeL`, ...) and the table (id, prompt, reference, generation) a trial logs."""
    rows = frame.head(cfg.task.generation_rows)
    generated = predict_texts(model, tokenizer, cfg, list(rows["prompt"]), device)
    scores = generation_metrics(generated, list(rows["reference"]))
    table = pd.DataFrame({"id": range(len(rows)), "prompt": [_shown(p) for p in rows["prompt"]],
                          "reference": list(rows["reference"]), "generation": generated})
    return {record.metric_key(prefix, k): v for k, v in scores.items()}, table


def generation_rows(cfg: TrialConfig, table: pd.DataFrame) -> pd.DataFrame:
    """sft: each generated row's scores, from the table `generate_split` returns (same rows, same order):
    ROUGE-L and exact match as the metric modules score a row (their means are the logged metrics), sentence
    chrF and BLEU (sacrebleu's sentence scores: corpus chrF and BLEU are not means over rows), each in [0, 1];
    `score` is the task metric's column (NaN for loss and perplexity), and the generation and its reference
    are kept so corpus metrics can be compared by resampling rows."""
    import sacrebleu
    from rouge_score import rouge_scorer

    generated, references = [str(g) for g in table["generation"]], [str(r) for r in table["reference"]]
    # as trainers/metric_modules/rouge and exact_match score a row: no stemming, whitespace-normalised equality
    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    # the modules' settings; BLEU with effective order, as sacrebleu scores a single sentence
    chrf, bleu = sacrebleu.CHRF(), sacrebleu.BLEU(effective_order=True)
    rows = pd.DataFrame({
        "rougeL": [rouge.score(r, g)["rougeL"].fmeasure for g, r in zip(generated, references)],
        "chrf": [chrf.sentence_score(g, [r]).score / 100 for g, r in zip(generated, references)],
        "bleu": [bleu.sentence_score(g, [r]).score / 100 for g, r in zip(generated, references)],
        "exact_match": [float(" ".join(g.split()) == " ".join(r.split())) for g, r in zip(generated, references)],
        "generation": generated, "reference": references})
    rows.insert(0, record.ROW_SCORE, rows[cfg.task.metric] if cfg.task.metric in rows else float("nan"))
    return rows


def row_record(cfg: TrialConfig, frame: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """A split's per-row record as a trial logs it: `row_id` (data.row_ids of the split's rows) first, then the
    row scores: `evaluate_rows`'s frame, or for sft the generations table of `generate_split` (its first
    `generation_rows` rows), scored by `generation_rows`."""
    if cfg.task.type == "sft":
        rows = generation_rows(cfg, rows)
    elif len(rows) != len(frame):
        raise ValueError(f"{len(rows)} scored rows for a split of {len(frame)}: row ids would not line up")
    rows = rows.reset_index(drop=True)
    rows.insert(0, record.ROW_ID, data.row_ids(frame.head(len(rows)), cfg.task))
    return rows


def write_row_record(rows: pd.DataFrame, path) -> None:
    """One split's record as {"columns", "data"} JSON (record.ROW_SCORES_DIR): Python's float repr reads back
    the same double, so the mean of `score` is the logged metric exactly; a missing value is null."""
    import json
    import math

    def plain(value):
        value = value.item() if hasattr(value, "item") else value  # numpy scalars as Python's
        return None if isinstance(value, float) and math.isnan(value) else value

    with open(path, "w") as out:
        json.dump({"columns": [str(c) for c in rows.columns],
                   "data": [[plain(v) for v in row] for row in rows.itertuples(index=False, name=None)]},
                  out, ensure_ascii=False, allow_nan=False)


def _shown(prompt) -> str:
    """A prompt as a table cell: a conversation so far reads as `role: content` lines."""
    if isinstance(prompt, list):
        return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    return str(prompt)


def score_split(model, tokenizer, cfg: TrialConfig, split: str = "test", device: str = "auto") -> dict:
    """Task metrics of `split` (`test_accuracy`, ...), from the same deterministic partition the trial used."""
    frame = data.load_splits(cfg.task)[split]
    device = pick_device(device)
    scores = evaluate(model, encode(frame, tokenizer, cfg), tokenizer, cfg, device, split)
    if cfg.task.type == "sft":
        scores.update(generate_split(model, tokenizer, cfg, frame, device, split)[0])
    return scores


def predict_texts(model, tokenizer, cfg: TrialConfig, inputs: list, device: str = "auto") -> list[str]:
    """What the model answers for raw inputs, exactly as a split is scored: label names for classification;
    for sft the generated text (an input is the user's text, or a conversation so far as a list of
    {role, content})."""
    device = pick_device(device)
    if cfg.task.type == "sft":
        prompts = [sft.prompt_ids(p, tokenizer, cfg.task) for p in inputs]
        with loop.autocast_for(device, cfg.train.precision):
            return generation.generate(model, tokenizer, prompts, cfg.task.max_new_tokens, eval_batch_size(cfg),
                                       device)
    frame = pd.DataFrame({"text": [str(t) for t in inputs], "label": [0] * len(inputs)})
    preds, _, _ = predict(model, encode(frame, tokenizer, cfg), tokenizer, cfg, device)
    return [cfg.task.labels[p] for p in preds]


def input_column(cfg: TrialConfig) -> str:
    """The column a served model reads: `text`; for sft `prompt`, or `messages` for a messages task."""
    if cfg.task.type != "sft":
        return "text"
    return "messages" if cfg.task.format == "messages" else "prompt"


def split_inputs(cfg: TrialConfig, split: str = "test") -> list:
    """The raw inputs of a split as a consumer would send them (the reload check): texts, or for sft the
    prompts of the rows a trial generates for."""
    frame = data.load_splits(cfg.task)[split]
    if cfg.task.type == "sft":
        return list(frame.head(cfg.task.generation_rows)["prompt"])
    return list(frame["text"])


def score_predictions(cfg: TrialConfig, predicted: list[str], split: str = "test") -> dict:
    """Task metrics of what a consumer predicted for `split_inputs(cfg, split)`, in that order."""
    frame = data.load_splits(cfg.task)[split]
    if cfg.task.type == "sft":
        return generation_metrics(predicted, list(frame.head(cfg.task.generation_rows)["reference"]))
    index = {label: i for i, label in enumerate(cfg.task.labels)}
    return metrics(cfg, [index[p] for p in predicted], list(frame["label"]))


def _per_row(adapter_names: list[str] | None, rows) -> dict:
    """The `adapter_names` keyword for a batch of these rows (PEFT splits each adapted layer by it); none
    for a model holding one adapter."""
    return {} if adapter_names is None else {"adapter_names": [adapter_names[i] for i in rows]}


def _predict_classification(model, encoded, tokenizer, device: str, batch_size: int,
                            adapter_names: list[str] | None = None):
    # Length-sorted batches pad little: evaluation costs about half as much as in data order.
    lengths = [len(ids) for ids in encoded["input_ids"]]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    loader = torch.utils.data.DataLoader(encoded.select(order), batch_size=batch_size,
                                         collate_fn=data.collate(tokenizer))
    model.eval()
    sorted_preds, sorted_refs, sorted_losses, loss_sum = [], [], [], 0.0
    with torch.no_grad():
        for start, batch in zip(range(0, len(order), batch_size), loader):
            labels = batch.pop("labels")
            names = _per_row(adapter_names, order[start: start + len(labels)])
            logits = model(**{k: v.to(device) for k, v in batch.items()}, **names).logits.float()
            sample_heap()
            loss_sum += torch.nn.functional.cross_entropy(logits, labels.to(device), reduction="sum").item()
            # each row's own too (a [batch, labels] tensor: nothing next to the forward pass); the sum above
            # stays as it was, so the logged loss does not move by a rounding
            sorted_losses += torch.nn.functional.cross_entropy(logits, labels.to(device), reduction="none").tolist()
            sorted_preds += logits.argmax(-1).tolist()
            sorted_refs += labels.tolist()
    preds, refs, row_losses = [0] * len(order), [0] * len(order), [0.0] * len(order)
    for position, row in enumerate(order):
        preds[row], refs[row], row_losses[row] = sorted_preds[position], sorted_refs[position], sorted_losses[position]
    # mean cross-entropy: a continuous signal for schedulers (accuracy on a small validation set ties often)
    return preds, refs, loss_sum / max(1, len(refs)), row_losses


def predict_by_likelihood(model, rows, tokenizer, labels: list[str], device: str,
                          batch_size: int) -> tuple[list[int], list[int], float]:
    """Causal LM: predict the label whose answer tokens are most likely after the prompt; also the mean
    loss of the true answers (validation loss; exp of it is the answer perplexity)."""
    return _likelihood_rows(model, rows, tokenizer, labels, device, batch_size)[:3]


@torch.no_grad()
def _likelihood_rows(model, rows, tokenizer, labels: list[str], device: str, batch_size: int,
                     adapter_names: list[str] | None = None) -> tuple[list[int], list[int], float, list[float]]:
    """`predict_by_likelihood`, and each row's loss per answer token of its true label.

    Sequences are left-padded so every answer ends at the last position, and only the last
    (longest answer + 1) positions get logits: the full [batch x labels, seq, vocab] fp32 logits of a
    large-vocabulary model would be the biggest tensor of the whole evaluation."""
    model.eval()
    eos = tokenizer.eos_token or ""
    answers = [tokenizer(" " + lab + eos, add_special_tokens=False)["input_ids"] for lab in labels]
    keep = max(map(len, answers)) + 1
    preds, refs, row_losses, true_nll, true_tokens = [], [], [], 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        seqs = [row["input_ids"][: row["prompt_len"]] + ans for row in chunk for ans in answers]
        width = max(map(len, seqs))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(s)) + s for s in seqs], device=device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift the real tokens' positions
        names = _per_row(adapter_names, [start + j for j in range(len(chunk)) for _ in answers])
        try:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep,
                           **names).logits
        except TypeError:  # an architecture without logits_to_keep: compute all, keep the tail
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **names).logits
        logprobs = torch.log_softmax(logits[:, -keep:].float(), -1)
        sample_heap()
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
            row_losses.append(-per_label[row["class_label"]] / len(answers[row["class_label"]]))
    # the mean loss weighs rows by their answers' tokens; a row's own loss is per token of its answer
    return preds, refs, true_nll / max(1, true_tokens), row_losses
