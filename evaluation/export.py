"""`peftsweep export`: registered adapters out of MLflow, for servers that are not MLflow.

- `vllm`: each adapter as the PEFT folder vLLM reads (adapter_model.safetensors + adapter_config.json, the base
  named portably: no path of this machine), and the `vllm serve` line that serves them all from one base.
  Refused, with vLLM's reason, before anything is written: a method other than LoRA, DoRA, `modules_to_save`
  (a classification head: vLLM serves generation), a LoRA bias, a rank above vLLM's largest `--max-lora-rank`.
- `merged`: each adapter folded into its full-precision base, as plain transformers safetensors weights with
  the tokenizer (and the label names for classification), with the merge-damage check promotion runs for an
  adapter trained on a quantized base: the merged model's test metric against the adapter's.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from evaluation.adapter_set import SetRefused, base_of, champions, fetch, refuse_mixed

# vLLM's accepted --max-lora-rank values (vllm/config/lora.py MaxLoRARanks); an adapter's rank must not exceed
# the value given, and the smallest that fits wastes the least memory: vLLM pads every slot to it
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_reasons(config: dict) -> list[str]:
    """Why vLLM would reject this adapter_config.json (empty: it loads)."""
    reasons = []
    if config.get("peft_type") != "LORA":
        reasons.append(f"vLLM serves LoRA adapters only, this is {config.get('peft_type')}")
    if config.get("use_dora"):
        reasons.append("vLLM does not support DoRA")
    if config.get("modules_to_save"):
        reasons.append(f"vLLM supports modules_to_save only as None, this trains {config['modules_to_save']} "
                       "(a classification head: serve it with `peftsweep serve-set` or merged)")
    if config.get("bias", "none") != "none":
        reasons.append("vLLM loads no LoRA bias without --enable-lora-bias")
    if int(config.get("r") or 0) > VLLM_MAX_LORA_RANKS[-1]:
        reasons.append(f"rank {config['r']} is above vLLM's largest --max-lora-rank, {VLLM_MAX_LORA_RANKS[-1]}")
    return reasons


def portable_base(cfg) -> str:
    """The base as another machine names it: a hub id as it is, a `pkg://` reference as it is, a local
    folder by the model's name (its path is this machine's)."""
    path = cfg.model.path
    return cfg.model.name if _local(path) and not path.startswith("pkg://") else path


def _local(path: str) -> bool:
    return path.startswith(("pkg://", "/", "./", "../", "~")) or Path(path).exists()


def export_vllm(adapters, dest: Path) -> dict:
    refused = [f"{a.name}: {'; '.join(r)}" for a in adapters if (r := vllm_reasons(a.config))]
    if refused:
        raise SetRefused("vLLM would reject " + " | ".join(refused))
    refuse_mixed(adapters)  # one base for one `vllm serve`
    paths = {}
    for a in adapters:
        out = dest / a.name
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(a.path, "adapter_model.safetensors"), out / "adapter_model.safetensors")
        config = {**a.config, "base_model_name_or_path": portable_base(a.cfg)}
        config.pop("revision", None) if not a.cfg.model.revision else config.update(revision=a.cfg.model.revision)
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        paths[a.name] = str(out.resolve())
    rank = next(r for r in VLLM_MAX_LORA_RANKS if r >= max(int(a.config["r"]) for a in adapters))
    cfg = adapters[0].cfg
    # a hub id as it is; a local or packaged base as the plain transformers folder this machine loads it from
    # (for a GGUF file, the safetensors copy training used): vLLM reads neither `pkg://` nor a GGUF folder
    base = _base_folder(cfg) if _local(cfg.model.path) else cfg.model.path
    line = (f"vllm serve {base}" + (f" --revision {cfg.model.revision}" if cfg.model.revision else "")
            + " --enable-lora --lora-modules " + " ".join(f"{n}={p}" for n, p in paths.items())
            + f" --max-lora-rank {rank} --max-loras {len(paths)}")
    (dest / "vllm_serve.sh").write_text("#!/bin/sh\n# every adapter of the set from one base; --max-loras: how many "
                                        "adapters one batch may mix\nexec " + line + "\n")
    return {"format": "vllm", "dir": str(dest), "adapters": paths, "command": line, "max_lora_rank": rank}


def _base_folder(cfg) -> str:
    from trainers import model_dir

    return model_dir(cfg)[0]


def export_merged(adapters, dest: Path) -> dict:
    from evaluation.promote import merge_damage
    from trainers import save_merged

    out = {}
    for a in adapters:
        target = dest / a.name
        merged = save_merged(a.path, str(target))
        cfg = merged[2]
        metric = cfg.task.metric
        logged = a.version.tags.get(f"test_{metric}")
        if logged is None:  # a version registered without it: score the adapter itself
            from trainers import load_trained, score_split
            from trainers import record

            model, tokenizer, _ = load_trained(a.path)
            logged = score_split(model, tokenizer, cfg, "test")[record.metric_key("test", metric)]
        out[a.name] = {"dir": str(target), "metric": metric, "adapter": float(logged),
                       **merge_damage(a.path, metric, float(logged), merged=merged)}
    return {"format": "merged", "dir": str(dest), "adapters": out}


def export(client, tracking_uri: str, specs: list[str], fmt: str, dest: str, base: str | None = None) -> dict:
    """Export `specs` (default: every champion of one base) to `dest` in `fmt` (vllm | merged)."""
    if fmt not in ("vllm", "merged"):
        raise SetRefused(f"unknown export format {fmt!r}: vllm or merged")
    target = Path(dest)
    if target.exists() and any(target.iterdir()):
        raise SetRefused(f"{dest} exists and is not empty: export into a new folder")
    with tempfile.TemporaryDirectory() as tmp:
        adapters = fetch(client, tracking_uri, specs or champions(client, base), tmp)
        target.mkdir(parents=True, exist_ok=True)
        out = export_vllm(adapters, target) if fmt == "vllm" else export_merged(adapters, target)
    out["base"] = base_of(adapters[0])
    return out
