"""Peak memory, throughput and MFU of full FT vs LoRA vs QLoRA on random-weight Llama models.

    python bench/gpu_table.py [--sizes 135m,1b] [--device cuda|cpu] [--steps N] [--batch B] [--seq L] [--out DIR]
    python bench/gpu_table.py combine --work DIR --out DIR   (bench/gpu_check.sh: one results file per device call)

Needs no Ray and no MLflow: the GPU machines have neither. Dtype policy, the usual one for each method:
  full FT: fp32 master weights with bf16 autocast. Plain bf16 AdamW weights lose small updates.
  LoRA: frozen base stored in bf16, since a frozen weight needs no master copy. Adapters in fp32.
  QLoRA: nf4 base with double quant and bf16 compute. Embeddings and norms stay bf16, as in the LoRA arms,
    so the two arms differ only in how the base Linears are stored. This is why
    prepare_model_for_kbit_training, which upcasts them to fp32, is not used.
On CPU everything is fp32 and memory is peak host RSS, sampled while the arm runs. The RSS includes what
earlier arms left in the allocator, so CPU memory ratios are rough. The training data is one fixed
random batch drawn from the first 1000 token ids, so a working arm visibly lowers the loss within a few
steps. Throughput does not depend on what the tokens are.
Each arm also carries trainers/estimate.py's prediction for its shape, checked against the measured peak
(allocated VRAM on CUDA, RSS on CPU): the sweep packs GPUs by that prediction, so its error is a headline figure.
"""
from __future__ import annotations

import argparse, contextlib, dataclasses, gc, json, os, platform, re, statistics, subprocess, sys, tempfile, threading, time, traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from trainers.flops import matmul_param_counts, mfu, peak_flops_for_device, transformer_flops_per_token  # noqa: E402

GIB = 1024**3
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
    # SmolLM2-135M
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152),
    # Llama-3.2-1B
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
}
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = ATTN + ["gate_proj", "up_proj", "down_proj"]
# arm -> (LoRA targets or None for full FT, learning rate). LoRA wants ~10x full FT's lr (MiniLM: 1e-3 vs 1e-4).
ARMS = {"full": (None, 1e-4), "lora_attn": (ATTN, 1e-3), "lora_all": (ALL_LINEAR, 1e-3), "qlora_nf4": (ALL_LINEAR, 1e-3)}
LORA_DROPOUT = 0.05
ESTIMATE_TOLERANCE = 0.15  # |predicted / measured - 1| within this counts as a hit


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _bnb_version() -> str:
    # A machine without bitsandbytes still gets the other three arms; the nf4 arm then fails on its own.
    try:
        import bitsandbytes
        return bitsandbytes.__version__
    except Exception as e:
        return f"missing: {type(e).__name__}: {e}"


def device_info(device: str) -> dict:
    import peft, transformers
    info = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "bitsandbytes": _bnb_version(), "python": platform.python_version()}
    if device == "cuda":
        info.update(name=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    total_gib=round(torch.cuda.get_device_properties(0).total_memory / GIB, 2))
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, IndexError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            name = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), name)
        info.update(name=f"cpu {name}", driver=None, threads=torch.get_num_threads())
    return info


def nvml_process_gib() -> float | None:
    """This process's GPU memory as the driver sees it: includes the CUDA context, which torch doesn't count."""
    try:
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        used = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid == os.getpid()]
        return round(used[0] / GIB, 3) if used and used[0] is not None else None
    except Exception:  # optional: missing package, no permission in a container, ...
        return None


class RssSampler:
    """Peak host RSS over a block. ru_maxrss can't be reset between arms, so sample instead."""

    def __enter__(self):
        import psutil
        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def build_model(size: str, arm: str, device: str, ckpt_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
    cuda = device == "cuda"
    cfg = LlamaConfig(**SIZES[size], tie_word_embeddings=True, max_position_embeddings=4096, attn_implementation="sdpa")
    targets, _ = ARMS[arm]
    torch.manual_seed(0)
    if arm == "qlora_nf4":
        half = torch.bfloat16 if cuda else torch.float32
        if not (ckpt_dir / "config.json").exists():  # bnb quantizes at load time, so it needs a checkpoint
            with torch.device(device):
                LlamaForCausalLM(cfg).to(half).save_pretrained(ckpt_dir)
            gc.collect(); torch.cuda.empty_cache() if cuda else None
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=half)
        model = LlamaForCausalLM.from_pretrained(ckpt_dir, quantization_config=quant, dtype=half,
                                                 device_map={"": 0} if cuda else {"": "cpu"})
        if not cuda:  # bitsandbytes CPU fast path: otherwise LoRA grads silently become None after an eval pass
            for m in model.modules():
                if hasattr(m, "support_avx512bf16_for_cpu"):
                    m.support_avx512bf16_for_cpu = False
    else:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
        if targets is not None and cuda:
            model.to(torch.bfloat16)
    if targets is not None:
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=LORA_DROPOUT, target_modules=targets,
                                                 task_type="CAUSAL_LM"))
    return model, cfg


def run_arm(size: str, arm: str, args, info: dict, ckpt_dir: Path) -> dict:
    """One arm, never raising: a failure is recorded in the arm's status and the table goes on."""
    rec: dict = {"arm": arm, "status": "ok", "targets": ARMS[arm][0], "lr": ARMS[arm][1]}
    try:
        _train_arm(size, arm, args, info, ckpt_dir, rec)
    except torch.OutOfMemoryError as e:
        rec.update(status="oom", error=str(e).splitlines()[0])
    except Exception as e:
        traceback.print_exc()
        # bitsandbytes' CPU 4-bit support is version-dependent, so on CPU that arm is optional.
        verb = "skipped" if arm == "qlora_nf4" and args.device == "cpu" else "failed"
        rec.update(status=f"{verb}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    # Only now, with _train_arm's frame gone, are the model, its grads and the optimizer state unreachable.
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return rec


def _train_arm(size: str, arm: str, args, info: dict, ckpt_dir: Path, rec: dict) -> None:
    cuda = args.device == "cuda"
    model, cfg = build_model(size, arm, args.device, ckpt_dir)
    frozen, trainable = matmul_param_counts(model)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rec.update(frozen_matmul_params=frozen, trainable_matmul_params=trainable, trainable_params=n_train,
               weight_dtypes=sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}))
    fpt = transformer_flops_per_token(frozen, trainable, cfg.num_hidden_layers, args.seq, cfg.hidden_size,
                                      full_finetune=ARMS[arm][0] is None)
    rec["flops_per_token"] = fpt
    try:  # before training, so an OOM row keeps its prediction; a failing estimate must not cost the row
        rec.update(predicted_memory(model, cfg, arm, args))
    except Exception as e:
        rec["predicted_error"] = f"{type(e).__name__}: {e}"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ARMS[arm][1], fused=cuda)
    ids = torch.randint(min(1000, cfg.vocab_size), (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    gc.collect()
    if cuda:
        torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    model.train()
    losses, times, grads_ok = [], [], True
    with (contextlib.nullcontext() if cuda else RssSampler()) as rss:
        for i in range(args.warmup + args.steps):
            if i == args.warmup:  # trainers evaluate between steps, and on CPU bnb that silently killed LoRA grads
                model.eval()
                with torch.no_grad(), autocast:
                    model(input_ids=ids[:1])
                model.train()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with autocast:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            grads_ok &= all(p.grad is not None for p in params)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    tps = args.batch * args.seq / statistics.median(times)
    peak = peak_flops_for_device(info["name"], "bf16" if cuda else "fp32")
    rec.update(losses=[round(x, 4) for x in losses], step_times_s=[round(t, 4) for t in times],
               tokens_per_s=round(tps, 1), grads_present_all_steps=grads_ok,
               mfu=None if peak is None else round(mfu(tps, fpt, peak), 4))
    if cuda:
        rec.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / GIB, 3),
                   peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 3),
                   nvml_process_gib_end=nvml_process_gib())
    else:
        rec["peak_rss_gib"] = round(rss.peak / GIB, 3)


def predicted_memory(model, cfg, arm: str, args) -> dict:
    """trainers/estimate.py's peak for this arm, fed the way predict_trial feeds it for a sweep's trial:
    peft's parameter counts (4-bit weights at full size), the base's storage dtype, every LoRA-adapted
    input (dropout > 0 keeps a copy of each), the logits of a causal LM, SDPA (no seq² scores)."""
    from peft.tuners.lora import LoraLayer

    from trainers.estimate import estimate
    from trainers.methods import parameter_counts

    trainable, total = parameter_counts(model)
    adapter = ARMS[arm][0] is not None
    cuda = args.device == "cuda"
    adapted = sum(m.in_features for m in model.modules() if isinstance(m, LoraLayer)) if LORA_DROPOUT > 0 else 0
    est = estimate(trainable, total, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                   args.batch, args.seq, "nf4" if arm == "qlora_nf4" else "none", adapter, args.device,
                   frozen_bytes=2.0 if cuda and adapter else 4.0, vocab=cfg.vocab_size, fused_attention=True,
                   adapted_inputs=adapted)
    return {"predicted_gib": round(est.total_gb, 3),
            "predicted_breakdown_gib": {k: round(v, 3) for k, v in dataclasses.asdict(est).items()}}


def add_ratios(arms: list[dict], mem_key: str) -> None:
    """Each figure over full FT's at the same size and seq: None where either arm did not finish."""
    base = next((a for a in arms if a["arm"] == "full" and a["status"] == "ok"), None)
    keys = {"mem_ratio_vs_full": mem_key, "reserved_ratio_vs_full": "peak_reserved_gib",
            "tokens_per_s_ratio_vs_full": "tokens_per_s", "mfu_ratio_vs_full": "mfu"}
    for a in arms:
        ok = base is not None and a["status"] == "ok"
        for out, key in keys.items():
            num, den = (a.get(key), base.get(key)) if ok else (None, None)
            a[out] = round(num / den, 3) if num is not None and den else None


def add_estimate_check(arms: list[dict], mem_key: str) -> None:
    """predicted / measured peak per arm, and whether it lands within ESTIMATE_TOLERANCE."""
    for a in arms:
        pred = a.get("predicted_gib")
        meas = a.get(mem_key) if a["status"] == "ok" else None
        a["estimate_measured_key"] = mem_key
        a["predicted_vs_measured"] = round(pred / meas, 3) if pred is not None and meas else None
        a["estimate_within_tolerance"] = (None if a["predicted_vs_measured"] is None
                                          else abs(a["predicted_vs_measured"] - 1) <= ESTIMATE_TOLERANCE)


def markdown(size: str, res: dict, cuda: bool) -> str:
    fmt = lambda v, f="{:.3f}": "–" if v is None else f.format(v)  # noqa: E731
    mem_cols = ["peak alloc GiB", "peak reserved GiB"] if cuda else ["peak RSS GiB"]
    ratio_cols = ["mem × full", "reserved × full"] if cuda else ["mem × full"]
    head = ["arm", "status", *mem_cols, "tokens/s", "MFU %", *ratio_cols, "tok/s × full", "MFU × full",
            "predicted GiB", "pred / meas"]
    lines = [f"### {size} ({res['total_params'] / 1e6:.1f} M params, batch {res['batch']} × seq {res['seq']})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in res["arms"]:
        mems = [a.get("peak_allocated_gib"), a.get("peak_reserved_gib")] if cuda else [a.get("peak_rss_gib")]
        ratios = [a.get("mem_ratio_vs_full"), a.get("reserved_ratio_vs_full")] if cuda else [a.get("mem_ratio_vs_full")]
        row = [a["arm"], a["status"], *map(fmt, mems), fmt(a.get("tokens_per_s"), "{:,.0f}"),
               fmt(None if a.get("mfu") is None else 100 * a["mfu"], "{:.1f}"),
               *(fmt(r, "{:.2f}") for r in ratios), fmt(a.get("tokens_per_s_ratio_vs_full"), "{:.2f}"),
               fmt(a.get("mfu_ratio_vs_full"), "{:.2f}"), fmt(a.get("predicted_gib")),
               fmt(a.get("predicted_vs_measured"), "{:.2f}")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["combine"]:
        return combine(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="135m,1b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    cuda = args.device == "cuda"
    info = device_info(args.device)
    results = {"info": info, "utc": datetime.now(timezone.utc).isoformat(), "args": vars(args), "sizes": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"gpu_table-{slug(info['name'])}-{stamp}.json"
    mem_key = "peak_allocated_gib" if cuda else "peak_rss_gib"
    for size in args.sizes.split(","):
        total = sum(p.numel() for p in _meta_model(size).parameters())  # tied table counted once
        res = {"config": SIZES[size], "total_params": total, "batch": args.batch, "seq": args.seq, "arms": []}
        results["sizes"][size] = res
        with tempfile.TemporaryDirectory(prefix=f"gpu_table-{size}-") as tmp:
            for arm in args.arms.split(","):
                res["arms"].append(run_arm(size, arm, args, info, Path(tmp)))
                add_ratios(res["arms"], mem_key)
                add_estimate_check(res["arms"], mem_key)
                # Written after every arm: when gpu_check.sh's time limit kills a stuck arm, the finished
                # arms are already on disk.
                path.write_text(json.dumps(results, indent=2))
        print(markdown(size, res, cuda) + "\n", flush=True)
    print(f"device: {info['name']} | driver {info.get('driver')} | torch {info['torch']} | wrote {path}")
    return path


# One row per (size, seq, arm) in gpu_check's results file, every key present (None where it does not apply),
# so a reader never has to ask whether a figure is missing or was never measured on that device.
ROW_FIELDS = ["size", "seq", "batch", "total_params", "arm", "status", "trainable_params", "peak_allocated_gib",
              "peak_reserved_gib", "peak_rss_gib", "nvml_process_gib_end", "tokens_per_s", "mfu",
              "mem_ratio_vs_full", "reserved_ratio_vs_full", "tokens_per_s_ratio_vs_full", "mfu_ratio_vs_full",
              "predicted_gib", "predicted_breakdown_gib", "estimate_measured_key", "predicted_vs_measured",
              "estimate_within_tolerance", "grads_present_all_steps", "weight_dtypes"]


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def combine(argv: list[str]) -> Path:
    """bench/gpu_check.sh's last phase: its work folder (meta.json, preflight.json, phases.jsonl, one
    gpu_table JSON per size and seq) → one results file with every figure, plus the same as markdown.
    Never raises on a missing piece: a phase that timed out or failed shows as such in the file."""
    ap = argparse.ArgumentParser(prog="gpu_table.py combine")
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    meta = _read_json(work / "meta.json", {})
    preflight = _read_json(work / "preflight.json", {})
    phases = []
    with contextlib.suppress(OSError):
        phases = [json.loads(line) for line in (work / "phases.jsonl").read_text().splitlines() if line.strip()]
    device = meta.get("device", "cpu")
    info = dict(preflight.get("info") or {})
    tables: dict[str, dict] = {}
    for path in sorted(work.glob("tables/*/gpu_table-*.json")):
        data = _read_json(path, None)
        if not data:
            continue
        info = {**data["info"], **info} if info else dict(data["info"])
        for size, res in data["sizes"].items():
            tables[f"{size}@{res['seq']}"] = res
    order = [f"{z}@{q}" for z in meta.get("sizes", []) for q in meta.get("seqs", [])]
    tables = dict(sorted(tables.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    info.setdefault("name", "unknown")
    info.setdefault("driver", None)
    phase_of = {p["name"]: p for p in phases}
    rows = []
    for size in meta.get("sizes") or sorted({k.split("@")[0] for k in tables}):
        for seq in meta.get("seqs", []) or sorted({int(k.split("@")[1]) for k in tables}):
            res = tables.get(f"{size}@{seq}", {})
            got = {a["arm"]: a for a in res.get("arms", [])}
            phase = phase_of.get(f"table-{size}-{seq}", {})
            for arm in meta.get("arms", list(ARMS)):
                a = got.get(arm) or {"arm": arm, "status": f"not run: phase table-{size}-{seq} "
                                                          f"{phase.get('status', 'did not start')}"}
                rows.append({"size": size, "seq": seq, "batch": res.get("batch", meta.get("batches", {}).get(str(seq))),
                             "total_params": res.get("total_params"),
                             **{k: a.get(k) for k in ROW_FIELDS if k not in ("size", "seq", "batch", "total_params")}})
    checked = [r for r in rows if r["estimate_within_tolerance"] is not None]
    hits = sum(r["estimate_within_tolerance"] for r in checked)
    measured = "peak_allocated_gib" if device == "cuda" else "peak_rss_gib"
    share = round(hits / len(checked), 3) if checked else None
    estimate_line = (f"estimate within ±{ESTIMATE_TOLERANCE:.0%} of {measured}: {hits}/{len(checked)} rows"
                     + (f" ({share:.0%})" if share is not None else ""))
    # On CPU the prediction includes RUNTIME_CPU_GB, a trial process's baseline (datasets, tokenizer, the
    # MLflow writer) that this bench process does not carry: CPU rows exercise the plumbing, not the estimator.
    note = None if device == "cuda" else "CPU: prediction includes a trial process's runtime this bench lacks"
    py = phase_of.get("pytest", {})
    pytest_res = {"summary": py.get("summary") or f"not run: {py.get('status', 'phase did not start')}",
                  "status": py.get("status", "did not start"), "files": py.get("files")}
    results = {"kind": "gpu_check", "utc_start": meta.get("utc_start"), "utc_end": datetime.now(timezone.utc).isoformat(),
               "args": meta, "info": info, "versions": preflight.get("versions", {}),
               "preflight": {k: v for k, v in preflight.items() if k not in ("info", "versions")},
               "pytest": pytest_res,
               "estimate_check": {"measured": measured, "tolerance": ESTIMATE_TOLERANCE, "rows_checked": len(checked),
                                  "within": hits, "share": share, "line": estimate_line, "note": note},
               "phases": phases, "rows": rows, "tables": tables}
    out.mkdir(parents=True, exist_ok=True)
    stamp = (meta.get("stamp") or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    path = out / f"gpu_check-{slug(info['name'])}-{stamp}.json"
    path.write_text(json.dumps(results, indent=2))
    cuda = device == "cuda"
    versions = " | ".join(f"{k} {info.get(k)}" for k in ("torch", "transformers", "peft", "bitsandbytes"))
    md = [f"## gpu_check on {info['name']} ({results['utc_start']})", "",
          f"driver {info.get('driver')} | cuda {info.get('cuda')} | python {info.get('python')} | {versions}", "",
          f"pytest -m gpu: {pytest_res['summary']}", "", estimate_line + (f" ({note})" if note else ""), ""]
    for key, res in tables.items():
        md += [markdown(key.split("@")[0], res, cuda), ""]
    md += ["| phase | status | wall s | budget s |", "|---|---|---|---|"]
    md += [f"| {p['name']} | {p['status']} | {p.get('wall_s')} | {p.get('budget_s')} |" for p in phases]
    path.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {path} and {path.with_suffix('.md').name}")
    return path


def _meta_model(size: str):
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**SIZES[size], tie_word_embeddings=True))


if __name__ == "__main__":
    main()
