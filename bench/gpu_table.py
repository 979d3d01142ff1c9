"""Peak memory, throughput and MFU of full FT vs LoRA vs QLoRA on random-weight Llama models.

    python bench/gpu_table.py [--sizes 135m,1b] [--device cuda|cpu] [--steps N] [--batch B] [--seq L] [--out DIR]

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
"""
from __future__ import annotations

import argparse, contextlib, gc, json, os, platform, re, statistics, subprocess, sys, tempfile, threading, time, traceback
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


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_info(device: str) -> dict:
    import bitsandbytes, peft, transformers
    info = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__, "python": platform.python_version()}
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
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets,
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


def add_ratios(arms: list[dict], mem_key: str) -> None:
    base = next((a for a in arms if a["arm"] == "full" and a["status"] == "ok"), None)
    for a in arms:
        ok = base is not None and a["status"] == "ok"
        a["mem_ratio_vs_full"] = round(a[mem_key] / base[mem_key], 3) if ok else None
        a["tokens_per_s_ratio_vs_full"] = round(a["tokens_per_s"] / base["tokens_per_s"], 3) if ok else None


def markdown(size: str, res: dict, cuda: bool) -> str:
    fmt = lambda v, f="{:.3f}": "–" if v is None else f.format(v)  # noqa: E731
    mem_cols = ["peak alloc GiB", "peak reserved GiB"] if cuda else ["peak RSS GiB"]
    head = ["arm", "status", *mem_cols, "tokens/s", "MFU %", "mem × full", "tok/s × full"]
    lines = [f"### {size} ({res['total_params'] / 1e6:.1f} M params, batch {res['batch']} × seq {res['seq']})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in res["arms"]:
        mems = [a.get("peak_allocated_gib"), a.get("peak_reserved_gib")] if cuda else [a.get("peak_rss_gib")]
        row = [a["arm"], a["status"], *map(fmt, mems), fmt(a.get("tokens_per_s"), "{:,.0f}"),
               fmt(None if a.get("mfu") is None else 100 * a["mfu"], "{:.1f}"),
               fmt(a.get("mem_ratio_vs_full"), "{:.2f}"), fmt(a.get("tokens_per_s_ratio_vs_full"), "{:.2f}")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
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
    for size in args.sizes.split(","):
        total = sum(p.numel() for p in _meta_model(size).parameters())  # tied table counted once
        res = {"config": SIZES[size], "total_params": total, "batch": args.batch, "seq": args.seq, "arms": []}
        with tempfile.TemporaryDirectory(prefix=f"gpu_table-{size}-") as tmp:
            for arm in args.arms.split(","):
                res["arms"].append(run_arm(size, arm, args, info, Path(tmp)))
        add_ratios(res["arms"], "peak_allocated_gib" if cuda else "peak_rss_gib")
        results["sizes"][size] = res
        print(markdown(size, res, cuda) + "\n", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"gpu_table-{slug(info['name'])}-{stamp}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"device: {info['name']} | driver {info.get('driver')} | torch {info['torch']} | wrote {path}")
    return path


def _meta_model(size: str):
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**SIZES[size], tie_word_embeddings=True))


if __name__ == "__main__":
    main()
