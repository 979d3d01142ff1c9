"""Bad input gets one clear line per problem and exit code 2 before Ray starts or any run is written."""
import subprocess

import pytest

from sweeps.cli import main
from tests.conftest import BIN

CASES = [
    (["model.path=/nonexistent/model"], "model.path '/nonexistent/model': no such file or directory"),
    (["model.path=no-such-org/no-such-model-xyz"], "cannot load model 'no-such-org/no-such-model-xyz'"),
    (["search=tiny", "method.target_modules=[query,nonexistent_proj]"], "target module 'nonexistent_proj' is not a linear layer"),
    (["method.r=0"], "method.r must be a positive integer, got 0"),
    (["method.r=-4"], "method.r must be a positive integer, got -4"),
    (["search.space.method.r=[4,0]"], "method.r must be a positive integer, got 0"),
    (["task.text_column=review"], "text_column 'review' is not a column"),
    (["task.label_column=sentiment"], "label_column 'sentiment' is not a column"),
    (["task.labels=[fresh,stale]"], "label(s) ['stale'] never occur"),
    (["search.space.method.r=[4096]"], "method.r=4096 exceeds the smallest targeted layer dimension (384)"),
    (["method.dropout=1.0"], "method.dropout must be in [0, 1)"),
    (["train.lrr=1"], "unknown config key 'train.lrr'"),
    (["model=nope"], "Could not find 'model/nope' (available: hub, minilm, smollm2_135m)"),
    (["quant=nf4", "train.device=cuda"], "no CUDA device is visible"),
    (["search.baseline.quant.mode=nf4"], "full fine-tuning cannot train quantized weights"),
    (["method.alpha=0"], "method.alpha must be > 0"),
    (["method.dropout=-0.1"], "method.dropout must be in [0, 1)"),
    (["method.name=qlora"], "method.name='qlora' is not one of"),
    (["method.target_modules=attn"], "is neither a preset"),
    (["method.target_modules=[]"], "method.target_modules is an empty list"),
    (["quant.mode=int4"], "quant.mode='int4' is not one of"),
    (["quant=nf4", "quant.compute_dtype=float16"], "compute_dtype=float16 is not supported on CPU"),
    (["quant.compute_dtype=float64"], "is not float32/bfloat16/float16"),
    (["train.lr=0"], "train.lr must be > 0"),
    (["train.batch_size=0"], "train.batch_size must be > 0"),
    (["train.grad_accum=-1"], "train.grad_accum must be > 0"),
    (["train.inject_fault=explode"], "is not raise@<step>, oom@<step> or kill@<step>"),
    (["task.type=regression"], "task.type='regression' is not one of"),
    (["task.max_length=0"], "task.max_length must be > 0"),
    (["task.test_size=20000"], "leaves no training rows"),
    (["task.labels=[fresh]"], "needs at least two classes"),
    (["task.source.path=/nonexistent.csv"], "does not exist"),
    (["task.source.format=xml"], "task.source.format='xml' is not one of csv, text_dirs, jsonl"),
    (["task.source.format=parquet"], "cannot read"),  # a CSV file read as Parquet
    # instruction tuning (task.type=sft)
    (["task=bbc_headlines", "task.columns.output=headline"], "format alpaca needs a 'output' column 'headline'"),
    (["task=bbc_headlines", "task.max_new_tokens=0"], "task.max_new_tokens must be > 0"),
    (["task=bbc_headlines", "task.format=chatml"], "task.format='chatml' is not one of alpaca, messages"),
    (["task=bbc_headlines", "task.metric=accuracy"], "task.metric='accuracy' is not an sft metric"),
    (["task=bbc_headlines", "+task.columns.answer=title"], "task.columns.answer is not a column role"),
    (["task=bbc_headlines", "scheduler=asha", "train.eval_every_steps=2"], "set search.metric=val_loss"),
    # MiniLM's tokenizer has no chat template: a chat file cannot be rendered with it
    (["task=bbc_headlines", "task.format=messages"], "format messages needs a chat template"),
    (["task=bbc_headlines", "task.source.format=hf", "task.source.path=no-such-org/no-such-dataset"],
     "cannot load dataset on the Hugging Face Hub"),
    (["search.seeds=[]"], "search.seeds is empty"),
    (["search.num_samples=0"], "search.num_samples must be >= 1"),
    (["search.mode=maximize"], "search.mode must be max or min"),
    (["+search.space.method.rank=[4]"], "'method.rank' is not a trial config key"),
    (["+search.space.train.lr={loguniform:[0,1]}"], "loguniform needs low > 0"),
    (["search.space.method.alpha={derive:'r**2'}"], "is not '<number> * <key>'"),
    (["searcher=bayes"], "Could not find 'searcher/bayes'"),
    (["scheduler.name=hyperband"], "scheduler.name='hyperband' is not fifo or asha"),
    (["cluster.cpus_per_trial=0"], "cluster.cpus_per_trial must be > 0"),
    (["+model.token=abc"], "unknown key model.token"),
    (["method=full", "quant=nf4", "search.full_ft_arm=false", "search.space.method.r=[4]"],
     "full fine-tuning cannot train quantized weights"),
    (["method.init_lora_weights=kaiming"], "method.init_lora_weights='kaiming' is not true, false, gaussian"),
    (["train.precision=fp8"], "train.precision='fp8' is not auto, fp32, bf16 or fp16"),
    (["model.dtype=int8"], "model.dtype='int8' is not auto, float32, bfloat16 or float16"),
    (["promote.rule=fastest"], "promote.rule='fastest' is not one of best, cheapest_within, best_under_budget"),
    (["promote.rule=best_under_budget"], "promote.rule=best_under_budget needs promote.memory_budget_gb > 0"),
    (["promote.cost=dollars"], "promote.cost='dollars' is not peak_mem or device_hours"),
    # a key set directly that the search space also sets would be silently overridden by the space
    (["method.target_modules=[q_proj,v_proj]"], "method.target_modules is set directly, but "
     "search.space.method.target_modules also sets it"),
    (["search=tiny", "method.r=16"], "method.r is set directly, but search.space.method.r also sets it"),
    # ASHA without intermediate evaluations could never stop a trial
    (["scheduler=asha"], "scheduler=asha needs train.eval_every_steps"),
    (["task.max_length=100000"], "task.max_length=100000 exceeds the 512 positions of minilm-l6"),
    # trials on several workers, and checkpoints
    (["train.workers=0"], "train.workers must be an integer >= 1 or 'auto', got 0"),
    (["train.strategy=zero3"], "train.strategy='zero3' is not auto, ddp or fsdp"),
    (["train.workers=2", "train.batch_size=5"], "train.batch_size=5 does not split evenly over train.workers=2"),
    (["train.workers=3", "train.batch_size=6"], "train.workers=3, but a trial can span at most 2"),
    (["train.checkpoint_every_steps=5"], "must be a multiple of train.eval_every_steps=None"),
    (["train.checkpoint_every_steps=5", "train.eval_every_steps=2"], "must be a multiple of train.eval_every_steps=2"),
    (["task=bbc_headlines", "train.workers=2", "train.packing=true"], "train.packing with train.workers > 1 is not supported yet"),
    # a full-FT arm that no count of this machine's workers can hold: refused, naming what would fit
    (["+search.baseline.train.workers=auto", "cluster.gpus_per_trial=1", "cluster.gpu_memory_gb=0.75",
      "cluster.num_gpus=2"], "on 2 workers, more than the 0.7 GB each can hold; 4 workers would fit"),
]


@pytest.mark.parametrize("overrides,message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_refused_before_ray(overrides, message, store, capsys):
    # tiny sizes so that a case wrongly accepted fails its asserts in seconds, not after a full sweep
    code = main(["sweep", f"tracking.uri={store['uri']}", "train.max_steps=1", "task.train_size=16",
                 "task.validation_size=16", "task.test_size=16", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert all(line.startswith("peftsweep: error: ") for line in err.strip().splitlines())
    assert not (store["dir"] / "ray_results").exists(), "Ray must not have started"
    assert not (store["dir"] / "mlflow.db").exists(), "no run may be written for a refused sweep"


def test_every_problem_is_listed_not_just_the_first(store, capsys):
    code = main(["plan", "search=tiny", "task.text_column=review", "method.target_modules=[nonexistent_proj]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 2, err


def test_real_cli_exit_code(store):
    proc = subprocess.run([str(BIN / "peftsweep"), "sweep", "method.r=0"], capture_output=True, text=True,
                          cwd=store["dir"], timeout=120)
    assert proc.returncode == 2
    assert "peftsweep: error: method.r must be a positive integer, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr


BAD_CHATS = {
    "not a list": ({"messages": "hello there"}, "messages must be a non-empty list of {role, content}"),
    "unknown role": ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
                     "unknown role 'robot'"),
    "no content": ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
                   "each message needs role and content"),
    "empty answer": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
                     "the answer is empty"),
    "ends with the user": ({"messages": [{"role": "user", "content": "hi"}]}, "the last message is from 'user'"),
}


@pytest.mark.parametrize("case", list(BAD_CHATS))
def test_a_bad_chat_row_is_refused_before_ray(case, tiny_llama, store, capsys):
    import json

    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad, message = BAD_CHATS[case]
    path = store["dir"] / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good] * 30 + [bad] + [good] * 9) + "\n")
    code = main(["sweep", f"tracking.uri={store['uri']}", "task=bbc_headlines", "task.format=messages",
                 "task.source.format=jsonl", f"task.source.path={path}", f"model.path={tiny_llama}",
                 "task.test_size=4", "task.validation_size=4", "train.max_steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "row 30 of" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (store["dir"] / "ray_results").exists() and not (store["dir"] / "mlflow.db").exists()
