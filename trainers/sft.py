"""Instruction tuning data: every format becomes one conversation per row, rendered to text, tokenized with
character offsets, and trained on the assistant turns only.

- `alpaca` (instruction, input, output) → [user: instruction + input, assistant: output]
- `messages` (a list of {role, content}) → itself; every assistant turn is trained on
- `prompt_completion` (prompt, completion) → raw text: prompt, then completion (no chat template)

alpaca and messages rows are rendered with the tokenizer's chat template (or `task.chat_template`); an
alpaca row without any template falls back to a plain "### Instruction / ### Response" layout. The labels
are -100 except on the tokens whose characters fall inside an assistant turn's span: the span is measured
on the rendered text (template rendered up to the turn with a generation prompt, then through it), so a
response marker that tokenizes differently in context (trl#598, trl#1183) cannot misplace the mask. A span
runs through the template's end-of-turn token: the model must learn to stop.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd

from trainers.config import ConfigError, TaskConfig

ROLES = ("system", "user", "assistant")
DEFAULT_COLUMNS = {"alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
                   "messages": {"messages": "messages"},
                   "prompt_completion": {"prompt": "prompt", "completion": "completion"}}


def columns(task: TaskConfig) -> dict:
    """{role: column} of the task's format, the user's `task.columns` over the defaults. Roles of another
    format are ignored, so `task.format=messages` reuses a task written for alpaca without other changes."""
    roles = {r for cols in DEFAULT_COLUMNS.values() for r in cols}
    unknown = sorted(set(task.columns) - roles)
    if unknown:
        raise ConfigError(f"task.columns.{unknown[0]} is not a column role (roles: {', '.join(sorted(roles))})")
    defaults = DEFAULT_COLUMNS[task.format]
    return {**defaults, **{r: c for r, c in task.columns.items() if r in defaults}}


def required_columns(task: TaskConfig) -> list[str]:
    cols = columns(task)
    if task.format == "alpaca":  # input is optional: instruction-only rows are common
        return [c for role, c in cols.items() if role == "output" or (role == "instruction" and not task.instruction)]
    return list(cols.values())


def check_columns(task: TaskConfig, present) -> None:
    present = [str(c) for c in present]
    for column in required_columns(task):
        if column not in present:
            role = next(r for r, c in columns(task).items() if c == column)
            raise ConfigError(f"task {task.name}: format {task.format} needs a {role!r} column {column!r}, but "
                              f"{task.source.path} has: {', '.join(present)} (set task.columns.{role}=<column>)")


def normalize(frame: pd.DataFrame, task: TaskConfig) -> pd.DataFrame:
    """One conversation per row (`messages`, ending with the assistant answer), the consumer's request
    (`prompt`: the user's text, or the conversation so far for `messages`) and the `reference` answer."""
    check_columns(task, frame.columns)
    cols = columns(task)
    rows = []
    for i, record in enumerate(frame.to_dict("records")):
        where = f"task {task.name}: row {i} of {task.source.path}"
        if task.format == "messages":
            messages = _checked_messages(record[cols["messages"]], where)
            prompt = messages[:-1]
        elif task.format == "alpaca":
            instruction = task.instruction if task.instruction else _text(record[cols["instruction"]])
            given = _text(record.get(cols["input"], "")) if cols["input"] in record else ""
            if task.input_max_chars:
                given = given[: task.input_max_chars]
            prompt = f"{instruction}\n\n{given}" if given else instruction
            messages = [{"role": "user", "content": prompt},
                        {"role": "assistant", "content": _text(record[cols["output"]])}]
        else:
            given = _text(record[cols["prompt"]])
            prompt = given[: task.input_max_chars] if task.input_max_chars else given
            messages = [{"role": "user", "content": prompt},
                        {"role": "assistant", "content": _text(record[cols["completion"]])}]
        if not messages[-1]["content"].strip():
            raise ConfigError(f"{where}: the answer is empty (nothing to learn or to score against)")
        rows.append({"messages": messages, "prompt": prompt, "reference": messages[-1]["content"]})
    return pd.DataFrame(rows, columns=["messages", "prompt", "reference"])


def _text(value) -> str:
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)


def _checked_messages(cell, where: str) -> list[dict]:
    if hasattr(cell, "tolist"):  # a numpy array of dicts, as pandas may hold a list column
        cell = cell.tolist()
    if not isinstance(cell, list) or not cell or not all(isinstance(m, dict) for m in cell):
        raise ConfigError(f"{where}: messages must be a non-empty list of {{role, content}}, got "
                          f"{type(cell).__name__}")
    out = []
    for m in cell:
        if "role" not in m or "content" not in m:
            raise ConfigError(f"{where}: each message needs role and content, got keys {sorted(m)}")
        if m["role"] not in ROLES:
            raise ConfigError(f"{where}: unknown role {m['role']!r} (roles: {', '.join(ROLES)})")
        out.append({"role": m["role"], "content": _text(m["content"])})
    if out[-1]["role"] != "assistant":
        raise ConfigError(f"{where}: the last message is from {out[-1]['role']!r}; a training row ends with "
                          "the assistant's answer")
    return out


# --- rendering ---------------------------------------------------------------------------------------

def template_problem(tokenizer, task: TaskConfig) -> str | None:
    """Why this task cannot render its rows with this tokenizer, or None."""
    if task.format == "prompt_completion":
        return None
    if task.chat_template and not Path(task.chat_template).expanduser().is_file():
        return f"task.chat_template {task.chat_template!r}: no such file"
    if task.format == "messages" and not (task.chat_template or getattr(tokenizer, "chat_template", None)):
        return (f"task {task.name}: format messages needs a chat template, and the tokenizer of this model has "
                "none: set task.chat_template=<a Jinja template file>")
    if not getattr(tokenizer, "is_fast", False):
        return "sft masking needs a fast tokenizer (character offsets); this model only has a slow one"
    return None


def _template(tokenizer, task: TaskConfig) -> str | None:
    if task.chat_template:
        return _read_template(task.chat_template)
    return getattr(tokenizer, "chat_template", None)


@functools.lru_cache(maxsize=8)
def _read_template(path: str) -> str:
    return Path(path).expanduser().read_text()  # read once, not once per row


def render(messages: list[dict], tokenizer, task: TaskConfig, generation: bool = False):
    """(text, answer spans as character ranges). `generation`: `messages` ends before the answer and the
    text ends where the model starts writing it (no spans)."""
    eos = tokenizer.eos_token or ""
    if task.format == "prompt_completion":
        prompt = messages[0]["content"]
        if generation:
            return prompt, []
        return prompt + messages[1]["content"] + eos, [(len(prompt), len(prompt) + len(messages[1]["content"] + eos))]
    template = _template(tokenizer, task)
    if template is None:
        return _plain(messages, eos, generation)

    def chat(msgs, prompt_next):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt_next,
                                             chat_template=template)

    if generation:
        return chat(messages, True), []
    text = chat(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = chat(messages[:i], True), chat(messages[: i + 1], False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ConfigError(f"task {task.name}: the chat template renders a conversation differently from its "
                              "own prefixes, so answer spans cannot be located (set task.chat_template)")
        turn = through[len(before):]
        # through the end-of-turn token, not the newline a template writes after it
        end = turn.rfind(eos) + len(eos) if eos and eos in turn else len(turn.rstrip())
        spans.append((len(before), len(before) + end))
    return text, spans


def _plain(messages: list[dict], eos: str, generation: bool):
    text, spans = "", []
    for m in messages:
        if m["role"] == "system":
            text += m["content"] + "\n\n"
        elif m["role"] == "user":
            text += f"### Instruction:\n{m['content']}\n\n### Response:\n"
        else:
            spans.append((len(text), len(text) + len(m["content"] + eos)))
            text += m["content"] + eos + "\n\n"
    return text, ([] if generation else spans)


# --- tokenizing --------------------------------------------------------------------------------------

def encode_row(messages: list[dict], tokenizer, task: TaskConfig) -> dict | None:
    """input_ids and labels (-100 outside the answer spans) of one conversation, cut from the left to
    max_length; None when the answers alone do not fit (the row is dropped and counted)."""
    text, spans = render(messages, tokenizer, task)
    enc = tokenizer(text, add_special_tokens=_adds_specials(task, tokenizer), return_offsets_mapping=True)
    ids, labels = enc["input_ids"], []
    for token, (start, end) in zip(ids, enc["offset_mapping"]):
        # any overlap: a template that ends its prompt with a space merges it into the answer's first token
        # (" Hello"), which must still be learned
        inside = end > start and any(start < e and s < end for s, e in spans)
        labels.append(token if inside else -100)
    trained = [i for i, label in enumerate(labels) if label != -100]
    if not trained or len(ids) - trained[0] > task.max_length:
        return None
    cut = max(0, len(ids) - task.max_length)  # the prompt is cut from the left, the answer kept
    return {"input_ids": ids[cut:], "attention_mask": [1] * (len(ids) - cut), "labels": labels[cut:]}


def prompt_ids(prompt, tokenizer, task: TaskConfig) -> list[int]:
    """Token ids the model continues from to answer `prompt` (a user text, or a conversation so far)."""
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
    text, _ = render(messages, tokenizer, task, generation=True)
    ids = tokenizer(text, add_special_tokens=_adds_specials(task, tokenizer))["input_ids"]
    return ids[-task.max_length:]


def _adds_specials(task: TaskConfig, tokenizer) -> bool:
    # a chat template writes its own special tokens; raw and plain text get the tokenizer's (a BOS, say)
    return task.format == "prompt_completion" or _template(tokenizer, task) is None


def tokenize(frame: pd.DataFrame, tokenizer, task: TaskConfig):
    """(datasets.Dataset of input_ids/attention_mask/labels, rows dropped because the answer alone exceeds
    max_length)."""
    from datasets import Dataset

    rows = [encode_row(m, tokenizer, task) for m in frame["messages"]]
    kept = [r for r in rows if r is not None]
    data = {k: [r[k] for r in kept] for k in ("input_ids", "attention_mask", "labels")}
    return Dataset.from_dict(data), len(rows) - len(kept)
