"""How training rows become batches: shuffled (the default), grouped by length, or, for sft, packed.

Packing concatenates tokenized examples into rows of up to `task.max_length` tokens with position ids that
restart at every example and no attention mask: transformers then builds a block-diagonal causal mask from
the position ids (SDPA and eager on any device; flash-attention's varlen kernels on CUDA), so attention never
crosses an example and each example's loss is what it would be alone, at no padding cost.
"""
from __future__ import annotations

import torch

from trainers import data
from trainers.config import TrialConfig


def pack(encoded, max_length: int, seed: int) -> list[dict]:
    """Rows of whole examples, in seeded order, each filled up to `max_length` tokens (first fit of the
    current row; an example never straddles two rows). Each row keeps input_ids, labels, position_ids."""
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed)).tolist()
    rows, current = [], {"input_ids": [], "labels": [], "position_ids": [], "examples": 0}
    for i in order:
        ids, labels = encoded[i]["input_ids"], list(encoded[i]["labels"])
        if current["input_ids"] and len(current["input_ids"]) + len(ids) > max_length:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": [], "examples": 0}
        labels[0] = -100  # nothing predicts an example's first token from the example before it
        current["input_ids"] += ids
        current["labels"] += labels
        current["position_ids"] += list(range(len(ids)))
        current["examples"] += 1
    if current["input_ids"]:
        rows.append(current)
    return rows


def collate_packed(tokenizer):
    """Packed rows padded to the longest; the padding is one more 'example' (its own positions, no loss),
    and no attention mask, so the model derives the block-diagonal mask from position_ids."""
    def fn(rows):
        width = max(len(r["input_ids"]) for r in rows)
        pad = tokenizer.pad_token_id

        def padded(r, key, fill):
            return r[key] + [fill] * (width - len(r[key]))

        return {"input_ids": torch.tensor([padded(r, "input_ids", pad) for r in rows]),
                "labels": torch.tensor([padded(r, "labels", -100) for r in rows]),
                "position_ids": torch.tensor([r["position_ids"] + list(range(width - len(r["position_ids"])))
                                              for r in rows]),
                "token_count": torch.tensor(sum(len(r["input_ids"]) for r in rows)),
                "sequence_count": torch.tensor(sum(r["examples"] for r in rows))}
    return fn


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Batches of similar length: shuffle, cut into windows of `batch_size * window` rows, sort each window by
    length, cut it into batches, shuffle the batches. Seeded, and reshuffled every epoch from the same
    generator, so a run with the same seed sees the same batches."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, window: int = 50):
        self.lengths, self.batch_size, self.window = lengths, batch_size, window
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        span = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start: start + span], key=lambda i: -self.lengths[i])
            batches += [chunk[i: i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        for b in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[b]

    def __len__(self) -> int:
        span = self.batch_size * self.window
        return sum(-(-min(span, len(self.lengths) - s) // self.batch_size) for s in range(0, len(self.lengths), span))


def train_loader(encoded, tokenizer, cfg: TrialConfig):
    """The training DataLoader the trial's config asks for; the seed fixes its order."""
    t = cfg.train
    generator = torch.Generator().manual_seed(t.seed)
    if t.packing:
        return torch.utils.data.DataLoader(pack(encoded, cfg.task.max_length, t.seed), batch_size=t.batch_size,
                                           shuffle=True, generator=generator, collate_fn=collate_packed(tokenizer))
    if t.group_by_length:
        sampler = LengthGroupedBatches([len(ids) for ids in encoded["input_ids"]], t.batch_size, t.seed)
        return torch.utils.data.DataLoader(encoded, batch_sampler=sampler, collate_fn=data.collate(tokenizer))
    return torch.utils.data.DataLoader(encoded, batch_size=t.batch_size, shuffle=True, generator=generator,
                                       collate_fn=data.collate(tokenizer))
