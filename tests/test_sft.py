"""Instruction tuning (task.type=sft): data sources and formats, loss on the answers only (measured on the
real SmolLM2 tokenizer and chat template), the answers' loss and greedy generation, the generation metrics,
and a sweep over a user's own chat file through real Ray and MLflow, down to a served champion."""

import pandas as pd
import pytest
import torch

from sweeps.config import load
from trainers import data, generation, record, sft
from trainers.config import ConfigError

ROWS = [{"instruction": "Name the colour.", "input": f"The sky on day {i}.", "output": f"Blue, day {i}."}
        for i in range(40)]


def _task(**over):
    task = load(["task=bbc_headlines"]).trial.task
    task.train_size, task.validation_size, task.test_size, task.generation_rows = 24, 8, 8, 8
    for k, v in over.items():
        setattr(task, k, v)
    return task


@pytest.fixture(scope="module")
def smol_tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"  # SmolLM2's own, read from its GGUF file
    return tok


def _trained_text(row, tok) -> str:
    return tok.decode([t for t in row["labels"] if t != -100])


def test_only_assistant_turns_carry_loss_on_smollm2s_chat_template(smol_tokenizer):
    task = _task(format="messages")
    conversation = [{"role": "system", "content": "You write headlines."},
                    {"role": "user", "content": "Article: rates rose again."},
                    {"role": "assistant", "content": "Rates up again"},
                    {"role": "user", "content": "Shorter, please."},
                    {"role": "assistant", "content": "Rates rise"}]
    row = sft.encode_row(conversation, smol_tokenizer, task)
    # every assistant turn, through its end-of-turn token (the model must learn to stop), nothing else
    assert _trained_text(row, smol_tokenizer) == "Rates up again<|im_end|>Rates rise<|im_end|>"
    trained = [i for i, t in enumerate(row["labels"]) if t != -100]
    assert smol_tokenizer.decode(row["input_ids"][: trained[0]]).endswith("<|im_start|>assistant\n")
    assert row["labels"][-1] == -100  # the newline the template writes after the last turn is not trained


def test_alpaca_and_prompt_completion_rows_mask_the_prompt(smol_tokenizer):
    frame = pd.DataFrame(ROWS[:3])
    for fmt, task_cols, answer in (("alpaca", {"input": "input", "output": "output"}, "Blue, day 0.<|im_end|>"),
                                   ("prompt_completion", {"prompt": "input", "completion": "output"},
                                    "Blue, day 0.<|im_end|>")):
        task = _task(format=fmt, columns=task_cols, instruction=None if fmt == "prompt_completion" else "Name it.")
        conv = sft.normalize(frame, task)
        ds, dropped = sft.tokenize(conv, smol_tokenizer, task)
        assert dropped == 0 and _trained_text(ds[0], smol_tokenizer) == answer, fmt
    # prompt_completion is raw text: no chat markup at all
    assert "<|im_start|>" not in smol_tokenizer.decode(ds[0]["input_ids"])


def test_a_long_prompt_is_cut_from_the_left_and_a_too_long_answer_is_dropped(smol_tokenizer):
    task = _task(format="messages", max_length=40)
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "Short answer"}]
    row = sft.encode_row(long_prompt, smol_tokenizer, task)
    assert len(row["input_ids"]) == 40 and _trained_text(row, smol_tokenizer) == "Short answer<|im_end|>"
    long_answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "answer " * 100}]
    frame = pd.DataFrame({"messages": [long_prompt, long_answer, long_prompt]})
    ds, dropped = sft.tokenize(frame, smol_tokenizer, task)
    assert (len(ds), dropped) == (2, 1)


FILE_WRITERS = {
    "jsonl": lambda f, p: f.to_json(p, orient="records", lines=True),
    "json": lambda f, p: f.to_json(p, orient="records"),
    "parquet": lambda f, p: f.to_parquet(p),
    "csv": lambda f, p: f.to_csv(p, index=False),
}


@pytest.mark.parametrize("fmt", list(FILE_WRITERS))
def test_every_file_format_reads_the_same_rows(tmp_path, fmt):
    path = tmp_path / f"rows.{fmt}"
    FILE_WRITERS[fmt](pd.DataFrame(ROWS), path)
    task = _task(format="alpaca", columns={"input": "input", "output": "output"}, instruction=None)
    task.source.format, task.source.path = fmt, str(path)
    splits = data.load_splits(task)
    reference = data.load_splits(_with_source(task, "jsonl", _jsonl(tmp_path)))
    for name in ("train", "validation", "test"):
        assert list(splits[name]["reference"]) == list(reference[name]["reference"])
    assert splits["train"].iloc[0]["messages"][0]["content"].startswith("Name the colour.\n\nThe sky on day")


def _jsonl(tmp_path):
    path = tmp_path / "reference.jsonl"
    pd.DataFrame(ROWS).to_json(path, orient="records", lines=True)
    return str(path)


def _with_source(task, fmt, path):
    import copy

    task = copy.deepcopy(task)
    task.source.format, task.source.path = fmt, path
    return task


def test_a_sources_own_splits_are_kept_and_hf_datasets_load_from_disk(tmp_path):
    import datasets

    folder = tmp_path / "own"
    folder.mkdir()
    pd.DataFrame(ROWS[:30]).to_json(folder / "train.jsonl", orient="records", lines=True)
    pd.DataFrame(ROWS[30:]).to_json(folder / "test.jsonl", orient="records", lines=True)
    task = _task(format="alpaca", columns={"input": "input", "output": "output"}, instruction=None)
    splits = data.load_splits(_with_source(task, "jsonl", str(folder)))
    assert list(splits["test"]["reference"]) == [r["output"] for r in ROWS[30:38]]  # the file's own test rows
    assert not set(splits["validation"]["reference"]) & set(splits["test"]["reference"])  # carved from train

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:30]),
                          "test": datasets.Dataset.from_list(ROWS[30:])}).save_to_disk(str(saved))
    from_hf = data.load_splits(_with_source(task, "hf", str(saved)))
    assert list(from_hf["test"]["reference"]) == list(splits["test"]["reference"])


def test_a_hub_dataset_id_fails_in_one_line_offline():
    task = _with_source(_task(), "hf", "no-such-org/no-such-dataset")
    with pytest.raises(ConfigError) as err:
        data.load_splits(task)
    assert "cannot load dataset on the Hugging Face Hub" in str(err.value) and "\n" not in str(err.value)


def test_the_answers_loss_matches_the_models_own_loss_and_generation_ignores_batching(tiny_llama, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    task = _task(format="alpaca", columns={"input": "input", "output": "output"}, instruction=None)
    frame = sft.normalize(pd.DataFrame(ROWS[:6]), task)
    ds, _ = sft.tokenize(frame, smol_tokenizer, task)
    # the reference: each row alone, unpadded, through the model's own shifted cross-entropy
    nll = tokens = 0
    for row in ds:
        labels = torch.tensor([row["labels"]])
        n = int((labels[:, 1:] != -100).sum())
        nll += model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss.item() * n
        tokens += n
    batched = generation.answer_loss(model, ds, smol_tokenizer, batch_size=4, device="cpu")
    assert batched == pytest.approx(nll / tokens, rel=1e-4)

    prompts = [sft.prompt_ids(p, smol_tokenizer, task) for p in frame["prompt"]]
    alone = generation.generate_ids(model, smol_tokenizer, prompts, 6, batch_size=1, device="cpu")
    together = generation.generate_ids(model, smol_tokenizer, prompts, 6, batch_size=6, device="cpu")
    assert alone == together and all(alone)  # left padding changes no row's greedy continuation


def test_generation_metrics_match_the_reference_implementations():
    import sacrebleu
    from rouge_score import rouge_scorer

    from trainers.metrics import generation_metrics

    preds = ["Rates rise again in March", "Blair wins vote", "Apple unveils new iPod"]
    refs = ["Rates rise again", "Blair loses key vote", "Apple unveils new iPod"]
    out = generation_metrics(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert out["rougeL"] == pytest.approx(sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / 3)
    assert out["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score / 100)
    assert out["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score / 100)
    assert out["exact_match"] == pytest.approx(1 / 3)
    assert record.metric_mode("val_rougeL") == "max" and record.metric_mode("val_loss") == "min"


def test_the_sft_plan_has_a_base_arm_that_trains_nothing_and_ranks_by_rouge(tiny_llama):
    from sweeps.plan import build_plan

    cfg = load(["task=bbc_headlines", "search=sft", f"model.path={tiny_llama}", "model.name=tiny-llama"])
    plan = build_plan(cfg)
    assert (cfg.metric, cfg.mode) == ("val_rougeL", "max")
    assert list(plan.arms)[-1] == "base"  # no training FLOPs: it starts last
    base = next(t for t in plan.trials if t.arm == "base")
    lora = next(t for t in plan.trials if t.arm.startswith("lora"))
    assert (base.trainable, base.train_flops) == (0, 0.0) and base.config.method.name == "base"
    assert base.predicted_gb < lora.predicted_gb  # nothing kept for backward, no gradients, no optimizer
    assert sorted(plan.arms) == ["base", "dora-all_linear-lr0.001", "dora-attention_qv-lr0.001", "full-lr5e-05",
                                 "lora-all_linear-lr0.001", "lora-attention_qv-lr0.001"]
    loss = load(["task=bbc_headlines", "task.metric=loss", f"model.path={tiny_llama}"])
    assert (loss.metric, loss.mode) == ("val_loss", "min")


def _packed_logits(model, rows):
    from trainers.batching import collate_packed

    class Pad:  # the tiny model's pad id is irrelevant here: one packed row, nothing padded
        pad_token_id = 0

    batch = collate_packed(Pad())(rows)
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]


def test_packing_keeps_every_examples_loss_and_attention_within_it(tiny_llama, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    from trainers.batching import pack

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    task = _task(format="alpaca", columns={"input": "input", "output": "output"}, instruction=None)
    ds, _ = sft.tokenize(sft.normalize(pd.DataFrame(ROWS[:4]), task), smol_tokenizer, task)
    examples = [dict(r) for r in ds]
    rows = pack(examples, max_length=10_000, seed=0)
    assert len(rows) == 1 and rows[0]["examples"] == 4
    order = torch.randperm(4, generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        packed = _packed_logits(model, rows)
        start = 0
        for i in order:
            ids = examples[i]["input_ids"]
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            assert torch.allclose(packed[start: start + len(ids)], alone, atol=1e-5), i
            start += len(ids)
        # change one example's tokens (same length): no other example's logits move
        changed = [dict(e) for e in examples]
        changed[order[1]] = {**changed[order[1]], "input_ids": [t + 1 for t in changed[order[1]]["input_ids"]]}
        again = _packed_logits(model, pack(changed, max_length=10_000, seed=0))
    n0, n1 = len(examples[order[0]]["input_ids"]), len(examples[order[1]]["input_ids"])
    assert torch.equal(again[:n0], packed[:n0]) and torch.allclose(again[n0 + n1:], packed[n0 + n1:], atol=1e-6)
    assert not torch.allclose(again[n0: n0 + n1], packed[n0: n0 + n1])


def test_a_packed_step_computed_as_chunks_of_its_examples_has_the_packed_rows_loss_and_gradients(
        tiny_llama, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    import contextlib

    from trainers.batching import collate_packed, examples_batch, pack, train_loader, uses_varlen_attention
    from trainers.loop import forward_backward

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
    task = _task(format="alpaca", columns={"input": "input", "output": "output"}, instruction=None)
    ds, _ = sft.tokenize(sft.normalize(pd.DataFrame(ROWS), task), smol_tokenizer, task)
    longest = max(len(ids) for ids in ds["input_ids"])
    rows = pack([dict(r) for r in ds], max_length=2 * longest, seed=0)
    assert len(rows) >= 2 and any(r["examples"] >= 2 for r in rows)

    def loss_and_grads(batch):
        model.zero_grad()
        loss = forward_backward(model, batch, "cpu", contextlib.nullcontext(), torch.amp.GradScaler("cpu", enabled=False))
        return loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    as_rows, as_chunks = collate_packed(smol_tokenizer)(rows), examples_batch(smol_tokenizer, 3)(rows)
    assert len(as_chunks["chunks"]) >= 2 and sum(c["input_ids"].shape[0] for c in as_chunks["chunks"]) == len(ds)
    assert int(as_rows["token_count"]) == int(as_chunks["token_count"])
    row_loss, row_grads = loss_and_grads(as_rows)
    chunk_loss, chunk_grads = loss_and_grads(as_chunks)
    assert abs(row_loss - chunk_loss) < 1e-5
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(row_grads, chunk_grads))
    # which form a trial uses follows the attention kernel: packed rows only where kernels are varlen
    cfg = load(["task=bbc_headlines", f"model.path={tiny_llama}", "train.packing=true", "train.batch_size=2"]).trial
    assert uses_varlen_attention("flash_attention_2") and not uses_varlen_attention("sdpa")
    assert "position_ids" in next(iter(train_loader(ds, smol_tokenizer, cfg, "flash_attention_2")))
    assert "chunks" in next(iter(train_loader(ds, smol_tokenizer, cfg, "sdpa")))


def test_length_grouped_batches_pad_less_and_repeat_with_the_seed():
    from trainers.batching import LengthGroupedBatches

    lengths = [int(x) for x in torch.randint(5, 200, (400,), generator=torch.Generator().manual_seed(1))]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped = list(LengthGroupedBatches(lengths, 8, seed=3, window=10))
    assert sorted(i for b in grouped for i in b) == list(range(400)) and len(grouped) == 50
    shuffled = [list(range(400))[i: i + 8] for i in range(0, 400, 8)]  # arbitrary order pads like random
    assert padding(grouped) < 0.2 * padding(shuffled)
    assert grouped == list(LengthGroupedBatches(lengths, 8, seed=3, window=10))
    assert grouped != list(LengthGroupedBatches(lengths, 8, seed=4, window=10))


@pytest.mark.parametrize("knob", ["train.packing=true", "train.group_by_length=true"])
def test_a_packed_or_grouped_trial_repeats_its_metric_with_the_same_seed(knob, tiny_llama, store):
    from trainers.trial import run_trial

    cfg = load(["task=bbc_headlines", f"model.path={tiny_llama}", "model.name=tiny-llama", "task.train_size=32",
                "task.validation_size=8", "task.test_size=8", "task.generation_rows=4", "task.max_new_tokens=4",
                "train.batch_size=4", "train.max_steps=3", knob, f"tracking.uri={store['uri']}",
                f"tracking.artifact_location={store['artifacts']}"]).trial
    first, second = run_trial(cfg), run_trial(cfg)
    assert first["status"] == second["status"] == "ok"
    assert first["val_loss"] == second["val_loss"] and first["train_loss"] == second["train_loss"]
    assert 0 < first[record.SETUP_TIME_S] < first[record.WALL_TIME_S]


def test_a_tokenizer_without_a_chat_template_takes_one_from_a_file(smol_tokenizer, tmp_path):
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None
    task = _task(format="messages")
    assert "needs a chat template" in sft.template_problem(tok, task)
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% if m['role'] == 'assistant' %}"
                        "<|im_end|>{% endif %}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    task.chat_template = str(template)
    assert sft.template_problem(tok, task) is None
    row = sft.encode_row([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}], tok, task)
    # the template ends its prompt with a space, which the tokenizer merges into the answer's first token:
    # that token is trained (the answer's first word is not lost), space and all
    assert _trained_text(row, tok) == " Hello there<|im_end|>"
    assert tok.decode(row["input_ids"]).startswith("[user] Hi")  # rendered by the file's template
