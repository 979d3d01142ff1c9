"""How training rows become batches: shuffled (the default), grouped by length, or, for sft, packed.

Packing concatenates tokenized examples into rows of up to `task.max_length` tokens: a step then holds a
fixed token budget of whole examples, whatever their lengths. How a step is computed depends on the attention
kernel. Flash attention's varlen kernels (CUDA) take the packed rows as they are: position ids that restart
at every example and no attention mask, so attention never crosses an example and nothing is padded. SDPA and
eager attention would build a block-diagonal mask over the whole row and compute all of it; for them the
step's examples are sorted by length and computed as chunks of padded rows whose losses are weighted by
their answer tokens (`examples_batch`): the same step, loss and gradients, at almost no padding and no
cross-example attention computed (bench/attention_packing.py measures the three ways on CPU). Either way
each example's loss is what it is alone.
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


def examples_batch(tokenizer, rows_per_chunk: int):
    """The examples of a step's packed rows (cut where position ids restart), sorted by length and cut into
    chunks of `rows_per_chunk` padded rows: what kernels without varlen attention compute fastest. Each chunk
    carries its share of the step's answer tokens (`weight`), so the weighted chunk losses add up to the
    packed step's loss and gradients exactly."""
    padded = data.collate(tokenizer)

    def fn(rows):
        examples = sorted((e for r in rows for e in examples_of(r)), key=lambda e: len(e["input_ids"]))
        chunks = [padded(examples[i: i + rows_per_chunk]) for i in range(0, len(examples), rows_per_chunk)]
        answered = [int((c["labels"][:, 1:] != -100).sum()) for c in chunks]  # what a causal LM's loss averages
        for chunk, n in zip(chunks, answered):
            chunk["weight"] = torch.tensor(n / max(1, sum(answered)))
        return {"chunks": chunks, "token_count": torch.tensor(sum(len(e["input_ids"]) for e in examples)),
                "sequence_count": torch.tensor(len(examples))}
    return fn


def examples_of(row: dict) -> list[dict]:
    """The whole examples of a packed row: they start where its position ids restart."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    return [{"input_ids": row["input_ids"][a:b], "labels": row["labels"][a:b]} for a, b in zip(starts, starts[1:])]


def uses_varlen_attention(attn_implementation) -> bool:
    """Flash attention (2, 3 or a hub kernel) reads example boundaries from position ids without a mask."""
    return "flash" in str(attn_implementation or "")


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


def train_loader(encoded, tokenizer, cfg: TrialConfig, attn_implementation: str | None = None):
    """The training DataLoader the trial's config asks for; the seed fixes its order. A packed step is
    computed as packed rows under varlen attention, else as weighted chunks of its examples."""
    t = cfg.train
    generator = torch.Generator().manual_seed(t.seed)
    if t.packing:
        # a chunk of batch_size examples never holds more tokens than the batch_size packed rows of the step
        collate = (collate_packed(tokenizer) if uses_varlen_attention(attn_implementation)
                   else examples_batch(tokenizer, t.batch_size))
        return torch.utils.data.DataLoader(pack(encoded, cfg.task.max_length, t.seed), batch_size=t.batch_size,
                                           shuffle=True, generator=generator, collate_fn=collate)
    if t.group_by_length:
        sampler = LengthGroupedBatches([len(ids) for ids in encoded["input_ids"]], t.batch_size, t.seed)
        return torch.utils.data.DataLoader(encoded, batch_sampler=sampler, collate_fn=data.collate(tokenizer))
    return torch.utils.data.DataLoader(encoded, batch_size=t.batch_size, shuffle=True, generator=generator,
                                       collate_fn=data.collate(tokenizer))
