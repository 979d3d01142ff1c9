"""A sweep over a user's own chat file (messages format, JSON Lines written here, never committed) through
real Ray and MLflow: LoRA arms, full FT and the untouched base model; generations logged per trial and read
back; a report against full FT and base; an sft champion that `mlflow models serve` answers with text."""
import json

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from sweeps.cli import main
from tests.test_e2e import _champion_serves_like_direct_inference, _runs, _sweep
from trainers import record
from trainers.tracking import load_table

pytestmark = pytest.mark.slow


def _write_chats(path):
    """BBC articles as chat transcripts: a system line, the article, the headline; every fifth row goes on
    for a second turn (the headline again, shorter), so multi-turn rows train on both answers."""
    from trainers.sources import read
    from sweeps.config import load

    task = load(["task=bbc_headlines"]).trial.task
    frame = read(task.source, task.name)["all"].head(120)
    with open(path, "w") as fh:
        for i, row in enumerate(frame.itertuples()):
            messages = [{"role": "system", "content": "You write newspaper headlines."},
                        {"role": "user", "content": f"Headline for this article:\n{row.body[:300]}"},
                        {"role": "assistant", "content": row.title}]
            if i % 5 == 0:
                messages += [{"role": "user", "content": "Shorter, please."},
                             {"role": "assistant", "content": " ".join(row.title.split()[:3])}]
            fh.write(json.dumps({"messages": messages}) + "\n")


def test_a_messages_jsonl_sweep_end_to_end(tiny_llama, store, capsys):
    chats = store["dir"] / "chats.jsonl"
    _write_chats(chats)
    common = [f"tracking.uri={store['uri']}", "task=bbc_headlines"]
    task = ["task.format=messages", "task.source.format=jsonl", f"task.source.path={chats}", "task.max_length=128",
            "task.train_size=32", "task.validation_size=8", "task.test_size=8", "task.generation_rows=8",
            "task.max_new_tokens=8"]
    _sweep(store, [*common, *task, "search=sft", "search.space.method.name=[lora]",
                   "search.space.method.target_modules=[attention_qv]", f"model.path={tiny_llama}",
                   "model.name=tiny-llama", f"tracking.artifact_location={store['artifacts']}",
                   "train.max_steps=2", "train.eval_every_steps=1"])
    c, parents, children = _runs(store)
    # the user's chat file, not the task it borrowed its settings from, names the sweep and (below) the model
    (parent,) = parents
    assert parent.info.run_name.startswith("chats-tiny-llama-") and parent.data.params["name"] == "chats-tiny-llama"
    assert parent.data.params["task"] == "bbc_headlines" and parent.data.params["data_source"] == str(chats)
    arms = {r.data.tags[record.ARM]: r for r in children}
    assert sorted(arms) == ["base", "full-lr5e-05", "lora-lr0.001"]
    for arm, run in arms.items():
        assert run.data.tags[record.STATUS] == "ok", arm
        for m in ("val_rougeL", "test_rougeL", "val_chrf", "test_bleu", "test_exact_match", "val_loss",
                  "val_perplexity", record.SFT_ROWS_DROPPED):
            assert m in run.data.metrics, (arm, m)
    # eval passes logged the answers' loss during training (what ASHA can rank sft trials by)
    history = c.get_metric_history(arms["lora-lr0.001"].info.run_id, "val_loss")
    assert [m.step for m in history] == [1, 2]
    assert arms["base"].data.metrics[record.STEP] == 0  # scored as it is

    # every trial's generations, read back from MLflow: the same 8 validation rows in each arm
    table = load_table(c, parents[0].info.experiment_id, [r.info.run_id for r in children])
    assert len(table) == 8 * len(children)
    references = set(pd.read_json(chats, lines=True)["messages"].map(lambda m: m[-1]["content"]))
    assert set(table["reference"]) <= references and table.groupby("run_id")["id"].apply(sorted).map(
        lambda ids: ids == list(range(8))).all()

    # report and promote read the sweep's own metric without being told its task again
    assert main(["report", f"tracking.uri={store['uri']}"]) == 0
    md = capsys.readouterr().out
    assert "test rougeL %" in md and "vs base (pts)" in md and "val loss" in md
    assert md.count("| reference |") == 3  # three fixed examples, each across every arm
    assert "What each arm writes" in md
    assert f"Fitted on task `bbc_headlines`, data `{chats}` (jsonl)." in md

    assert main(["promote", f"tracking.uri={store['uri']}"]) == 0
    out = capsys.readouterr().out
    registry = MlflowClient(store["uri"])
    # never registered as (nor replacing) the shipped task's model
    assert [m.name for m in registry.search_registered_models()] == ["chats-tiny-llama"]
    version = registry.get_model_version_by_alias("chats-tiny-llama", "champion")
    assert f"fitted on task `bbc_headlines`, data `{chats}` (jsonl)" in version.description
    winner = c.get_run(version.run_id)
    assert winner.data.params["method"] == "lora" and "reproduces test rougeL" in out
    assert float(version.tags["reload_check"].split("=")[1]) == pytest.approx(winner.data.metrics["test_rougeL"])
    conversation = [{"role": "system", "content": "You write newspaper headlines."},
                    {"role": "user", "content": "Headline for this article:\nShares in the firm rose 5%."}]
    _champion_serves_like_direct_inference(store, c, winner, "models:/chats-tiny-llama@champion",
                                           "messages", [conversation, conversation[:1] + conversation[1:]])
