"""Causal-LM supervised fine-tuning: loss only on the answer, label-likelihood accuracy and perplexity,
target-module presets resolved for Llama-, Gemma- and GPT-2-style families."""
import pytest
import torch

from sweeps.config import load
from tests.test_trial import _cfg
from trainers import data, record
from trainers.modules import resolve_target_modules
from trainers.trial import run_trial


def _sft_cfg(tiny_llama, store, **method):
    cfg = _cfg(tiny_llama, store, **method)
    base = load(["task=rotten_tomatoes_sft"]).trial.task
    base.train_size, base.validation_size, base.test_size = 48, 32, 48
    cfg.task = base
    cfg.model.name = "tiny-llama"
    return cfg


def test_prompt_tokens_carry_no_loss(tiny_llama, store):
    from transformers import AutoTokenizer

    cfg = _sft_cfg(tiny_llama, store)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    frame = data.load_splits(cfg.task)["train"].head(4)
    ds = data.tokenize_sft(frame, tok, cfg.task)
    for row, label in zip(ds, frame["label"]):
        n = row["prompt_len"]
        assert all(x == -100 for x in row["labels"][:n])
        answer = tok.decode(row["labels"][n:], skip_special_tokens=True).strip()
        assert answer == cfg.task.labels[label]


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_sft_trial_trains_and_scores_by_likelihood(tiny_llama, store, method):
    targets = "attention_qv" if method == "lora" else ["k_proj", "v_proj", "down_proj"]
    out = run_trial(_sft_cfg(tiny_llama, store, name=method, r=4, alpha=8, target_modules=targets))
    assert out["status"] == "ok"
    for key in ("test_accuracy", "test_macro_f1", "test_loss", "test_perplexity", "val_loss"):
        assert key in out, key
    assert out["test_perplexity"] == pytest.approx(float(torch.exp(torch.tensor(out["test_loss"]))), rel=1e-4)
    assert 0.0 <= out["test_accuracy"] <= 1.0


def _tiny(family):
    import transformers as tf

    configs = {
        "llama": tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                vocab_size=64),
        "gemma": tf.GemmaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=8, vocab_size=64),
        "gpt2": tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64),
        "bert": tf.BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              vocab_size=64),
    }
    cls = tf.BertForSequenceClassification if family == "bert" else tf.AutoModelForCausalLM
    with torch.device("meta"):
        return cls.from_config(configs[family]) if family != "bert" else cls(configs[family])


KINDS = {
    ("llama", "attention_qv"): {"q_proj", "v_proj"},
    ("llama", "attention"): {"q_proj", "k_proj", "v_proj", "o_proj"},
    ("llama", "mlp"): {"gate_proj", "up_proj", "down_proj"},
    ("llama", "all_linear"): {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    ("gemma", "attention_qv"): {"q_proj", "v_proj"},
    ("gemma", "mlp"): {"gate_proj", "up_proj", "down_proj"},
    ("gpt2", "attention_qv"): {"c_attn"},  # fused q,k,v: the preset falls back to the fused layer
    ("gpt2", "attention"): {"c_attn", "attn.c_proj"},
    ("gpt2", "mlp"): {"c_fc", "mlp.c_proj"},
    ("bert", "attention"): {"query", "key", "value", "attention.output.dense"},
    ("bert", "mlp"): {"intermediate.dense", "layer.*.output.dense"},
}


@pytest.mark.parametrize("family,preset", list(KINDS), ids=[f"{f}-{p}" for f, p in KINDS])
def test_presets_resolve_to_the_family_names(family, preset):
    names = resolve_target_modules(_tiny(family), preset)
    kinds = set()
    for n in names:
        for k in KINDS[(family, preset)]:
            if n.endswith(k.split("*.")[-1]) and (("*" not in k) or ".attention." not in n):
                kinds.add(k)
    assert kinds == KINDS[(family, preset)], names
    assert not any(n.split(".")[-1] in ("lm_head", "classifier", "score") for n in names)
    assert len(names) == 2 * len(KINDS[(family, preset)])  # two layers


def test_the_packaged_gguf_model_becomes_a_plain_checkpoint(tmp_path, monkeypatch):
    """SmolLM2 ships as GGUF; trials load a dequantized safetensors copy made once. That copy must not
    still call itself gguf-quantized: full FT could not save it and bitsandbytes would refuse to quantize it."""
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from trainers.model import model_dir

    monkeypatch.setenv("PEFTSWEEP_CACHE", str(tmp_path / "cache"))
    cfg = load(["model=smollm2_135m", "task=rotten_tomatoes_sft"]).trial
    folder, _ = model_dir(cfg)
    assert Path(folder).is_relative_to(tmp_path) and any(Path(folder).glob("*.safetensors"))
    assert "quantization_config" not in json.loads((Path(folder) / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert getattr(model, "hf_quantizer", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    model.save_pretrained(tmp_path / "saved", safe_serialization=True)  # what a full-FT trial ships
    assert (tmp_path / "saved" / "model.safetensors").exists()


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # rotary positions, and absolute ones (left padding)
def test_likelihood_scoring_matches_one_unpadded_sequence_at_a_time(tiny_llama, store, family):
    """The batched, left-padded, tail-logits scorer against the plain definition: for each example and
    label, log P(answer | prompt) from a single unpadded forward pass."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from trainers import scoring

    cfg = _sft_cfg(tiny_llama, store)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.pad_token = tok.pad_token or tok.eos_token
    torch.manual_seed(0)
    model = (AutoModelForCausalLM.from_pretrained(tiny_llama) if family == "llama" else
             GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256)))
    model.eval()
    rows = list(data.tokenize_sft(data.load_splits(cfg.task)["test"].head(12), tok, cfg.task))
    labels = list(cfg.task.labels)
    preds, refs, loss = scoring.predict_by_likelihood(model, rows, tok, labels, "cpu", batch_size=5)

    answers = [tok(" " + lab + tok.eos_token, add_special_tokens=False)["input_ids"] for lab in labels]
    want_preds, nll, n_tokens = [], 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt = row["input_ids"][: row["prompt_len"]]
            scores = []
            for ans in answers:
                ids = torch.tensor([prompt + ans])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
                scores.append(sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(ans)))
            want_preds.append(max(range(len(labels)), key=scores.__getitem__))
            nll -= scores[row["class_label"]]
            n_tokens += len(answers[row["class_label"]])
    assert preds == want_preds and refs == [r["class_label"] for r in rows]
    assert loss == pytest.approx(nll / n_tokens, rel=1e-4)


@pytest.mark.slow
def test_a_causal_lm_champion_is_a_pyfunc_that_reproduces_its_metric(tiny_llama, store, capsys):
    """SFT adapters register as pyfunc models too: the fresh-process reload check scores raw text by label
    likelihood and must reproduce the metric the trial logged; predictions are label names."""
    import json
    import os
    import subprocess

    from mlflow.tracking import MlflowClient

    from sweeps.cli import main
    from tests.conftest import BIN, tiny_overrides
    from tests.test_e2e import _sweep

    overrides = [*tiny_overrides(tiny_llama, store), "model.name=tiny-llama", "task=rotten_tomatoes_sft"]
    _sweep(store, [*overrides, "search=tiny", "search.full_ft_arm=false", "search.space.method.r=[4]",
                   "train.max_steps=3"])
    assert main(["promote", *overrides]) == 0
    assert "Reload check (fresh process)" in capsys.readouterr().out
    c = MlflowClient(store["uri"])
    version = c.get_model_version_by_alias("rotten_tomatoes_sft-tiny-llama", "champion")
    logged = c.get_run(version.run_id).data.metrics["test_accuracy"]
    assert abs(float(version.tags["reload_check"].split("=")[1]) - logged) * 100 <= 0.5
    code = ("import json, sys, mlflow, pandas; m = mlflow.pyfunc.load_model(sys.argv[1]); "
            "print(json.dumps(list(m.predict(pandas.DataFrame({'text': ['a warm film', 'a dull mess']})))))")
    out = subprocess.run([str(BIN / "python"), "-c", code, "models:/rotten_tomatoes_sft-tiny-llama@champion"],
                         capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": store["uri"]},
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert set(json.loads(out.stdout.strip().splitlines()[-1])) <= {"fresh", "rotten"}
