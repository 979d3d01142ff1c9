"""A causal LM's two sft scores: the teacher-forced loss of the answers, and greedy generation.

Both batch left-padded sequences with position ids counted from each row's first real token, so a padded
row computes what it would alone; and the loss asks the model for logits of the last positions only (the
answers), since full-vocabulary logits over every position would be the largest tensor of the pass.
"""
from __future__ import annotations

import torch

from trainers.memory import sample_heap


def _left_pad(seqs: list[list[int]], pad: int, device: str):
    width = max(map(len, seqs))
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _by_length(seqs: list[list[int]], batch_size: int):
    """Batches of row indices, shortest first: little padding, and the same batches wherever it runs (the
    reload check reproduces a trial's generations exactly)."""
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def answer_loss(model, encoded, tokenizer, batch_size: int, device: str) -> float:
    """Mean negative log-likelihood per answer token (exp of it: the answers' perplexity)."""
    model.eval()
    ids_all, labels_all = list(encoded["input_ids"]), list(encoded["labels"])
    nll, tokens = 0.0, 0
    for batch in _by_length(ids_all, batch_size):
        seqs, labels = [ids_all[i] for i in batch], [labels_all[i] for i in batch]
        ids, mask, positions = _left_pad(seqs, tokenizer.pad_token_id, device)
        width = ids.shape[1]
        first = min(next(j for j, x in enumerate(lab) if x != -100) + width - len(lab) for lab in labels)
        keep = width - first + 1  # the logit before each answer token predicts it
        target = torch.tensor([[-100] * (width - len(lab)) + lab for lab in labels], device=device)[:, first:]
        try:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        except TypeError:  # an architecture without logits_to_keep
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        logits = logits[:, -keep:-1].float()
        sample_heap()
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=-100, reduction="sum").item()
        tokens += int((target != -100).sum())
    return nll / max(1, tokens)


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
             device: str) -> list[str]:
    """Greedy continuations of token-id prompts, decoded without special tokens, in input order."""
    return [text_of(tokenizer, ids) for ids in generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size,
                                                            device)]


def text_of(tokenizer, ids: list[int]) -> str:
    """A generation as the answer served and scored: decoded without special tokens, trimmed."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                 device: str, adapter_names: list[str] | None = None) -> list[list[int]]:
    """The new token ids of greedy decoding, up to and including the end-of-sequence token, in input order.
    `adapter_names`: one PEFT adapter per prompt, for a model holding several (trainers/adapters.py)."""
    model.eval()
    out: list[list[int]] = [[] for _ in prompts]
    eos = tokenizer.eos_token_id
    for batch in _by_length(prompts, batch_size):
        ids, mask, _ = _left_pad([prompts[i] for i in batch], tokenizer.pad_token_id, device)
        names = {} if adapter_names is None else {"adapter_names": [adapter_names[i] for i in batch]}
        new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                             temperature=None, top_p=None, top_k=None, **names)[:, ids.shape[1]:]
        sample_heap()  # the key/value cache of the whole batch is still alive here
        for i, row in zip(batch, new.tolist()):
            out[i] = row[: row.index(eos) + 1] if eos in row else row  # what follows eos is padding
    return out
