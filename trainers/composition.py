"""Compose the shipped Hydra config tree (`conf/`): used by the sweep CLI and by `python -m trainers`, so a
single trial takes the same groups and overrides as a sweep (`model=smollm2_135m method.r=16`)."""
from __future__ import annotations

import os
import re
from pathlib import Path

from trainers.config import ConfigError


def conf_dir() -> str:
    """The shipped Hydra config tree (repo `conf/`), or $PEFTSWEEP_CONF."""
    env = os.environ.get("PEFTSWEEP_CONF")
    return env or str(Path(__file__).resolve().parent.parent / "conf")


def compose(overrides: list[str] | None = None, config_name: str = "config") -> dict:
    """Hydra compose → plain dict (interpolations resolved). Raises ConfigError with one line."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:  # noqa: BLE001 - Hydra/OmegaConf errors are many types; all are config errors
        raise ConfigError(_one_line(exc)) from None


def _one_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    if "Could not find" in lines[0]:  # unknown group option: list the ones that exist
        opts = []
        if any(ln.startswith("Available options") for ln in lines):
            start = next(i for i, ln in enumerate(lines) if ln.startswith("Available options")) + 1
            opts = [ln for ln in lines[start:] if not ln.startswith(("Config search path", "provider="))]
            opts = opts[: next((i for i, o in enumerate(opts) if ":" in o), len(opts))]
        return lines[0].replace("In 'config': ", "") + (f" (available: {', '.join(opts)})" if opts else "")
    m = re.match(r"Could not override '([^']+)'", lines[0])
    if m and len(lines) > 1 and lines[1].startswith("To append"):
        return f"unknown config key {m[1]!r} (check the spelling; to add a new key use +{lines[1].split('+', 1)[1]})"
    return lines[0]
