"""A trial's training state, saved mid-run so a restarted trial continues where it stopped and ends where an
uninterrupted one ends (peft#859, torchtune#1551: resumes that dropped the optimizer or the LR schedule).

A checkpoint folder holds
- the trainable weights and AdamW state through torch.distributed.checkpoint (DCP): one shard file per rank
  with distinct names (`__<rank>_0.distcp`) plus `.metadata`, so each worker can write its own folder and a
  store (Ray's) can merge them; a frozen base is not saved (it is reloaded from its reference);
- `trainer_state.pt`: step, LR schedule, loss scaler, data position, the trial's MLflow run id (rank 0);
- `rng_rank<r>.pt`: every rank's RNG states (each draws its own dropout masks).

Where checkpoints go (a local folder, Ray's storage) is the caller's business: this module only writes and
reads a folder. Loaded with weights_only=True: a checkpoint never unpickles code.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

TRAINER_STATE = "trainer_state.pt"


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # strict=False: the frozen base is in the model but not in the checkpoint
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def rng_state() -> dict:
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    # numpy's key array as a tensor: the state then loads with weights_only=True
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(folder: str, model, optimizer, trainer_state: dict, rng: dict, rank: int) -> None:
    """Every rank calls this (DCP gathers the metadata from all of them); `trainer_state` is written by rank 0.
    `rng`: the RNG states to restore (the loop passes the state at the start of the data position)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    Path(folder).mkdir(parents=True, exist_ok=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=_options())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one process without a group: DCP says so, and saves
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder)
    torch.save(rng, Path(folder) / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save(trainer_state, Path(folder) / TRAINER_STATE)


def load(folder: str, model, optimizer, rank: int) -> tuple[dict, dict]:
    """Restore weights and optimizer in place; returns (trainer_state, rng states of this rank)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_options())
    state = {"model": model_state, "optim": optim_state}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options())
    trainer_state = torch.load(Path(folder) / TRAINER_STATE, weights_only=True)
    rng_file = Path(folder) / f"rng_rank{rank}.pt"
    rng = torch.load(rng_file if rng_file.exists() else Path(folder) / "rng_rank0.pt", weights_only=True)
    return trainer_state, rng


def run_id_of(folder: str) -> str | None:
    """The MLflow run a checkpoint belongs to (a resumed trial writes on into it), without loading weights."""
    path = Path(folder) / TRAINER_STATE
    return torch.load(path, weights_only=True).get("mlflow_run_id") if path.exists() else None
