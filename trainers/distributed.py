"""One trial over several worker processes, Ray-free: whoever starts the workers (Ray Train's TorchTrainer in a
sweep, `torchrun -m trainers` by hand) sets up torch.distributed; this module only reads it. A trial on one
worker never calls into torch.distributed and takes none of its costs.

- DDP (a full replica on every worker) when a replica fits one device: gradients all-reduced each backward.
- FSDP2 (`fully_shard` per transformer block, then the root) when it does not: weights, gradients and AdamW
  states divided by the world size, one block gathered at a time. On CPU the mesh is a CPU mesh over gloo.

`train.batch_size` stays the micro-batch of the whole trial: each worker computes its 1/world slice of every
micro-batch, so an arm answers the same question on 1 worker or 4 (the same rows make the same step) and its
trial key does not depend on where it ran.
"""
from __future__ import annotations

import os

import torch

STRATEGIES = ("auto", "ddp", "fsdp")


def world() -> tuple[int, int]:
    """(rank, world size) of this trial's process group; (0, 1) for a trial on one worker."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def join_from_env(device: str) -> None:
    """`torchrun` sets WORLD_SIZE and friends and leaves the group to us; Ray Train has made it already."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def device_for_rank(device: str) -> str:
    """Each worker its own GPU: Ray Train and torchrun export LOCAL_RANK."""
    if device.startswith("cuda") and world()[1] > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def choose_strategy(requested: str, full_finetune: bool) -> str:
    """`auto`: FSDP for full fine-tuning (the weights, gradients and AdamW states sharding divides are all of
    the model's), DDP for adapters (a frozen base replicates cheaply; sharding it would gather it every step)."""
    if requested != "auto":
        return requested
    return "fsdp" if full_finetune else "ddp"


def _blocks(model) -> list:
    """The repeated transformer blocks (the first ModuleList of length > 1): FSDP's unit of gathering."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1:
            return list(module)
    return []


def wrap(model, strategy: str, device: str):
    """The module training steps call: DDP around the model, or the model itself sharded in place by FSDP2.
    Evaluation and saving keep using the unwrapped model (DDP) or the sharded one (FSDP2, every rank joins)."""
    if world()[1] == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.device(device).index] if device.startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (world()[1],))
    for block in _blocks(model):
        # FSDP2 flattens a unit's parameters into one dtype: fp32 adapters next to a bf16 frozen base are
        # sharded as units of their own first, so the block's unit holds only the base's dtype
        if len({p.dtype for p in block.parameters()}) > 1:
            for name, sub in block.named_modules():
                if name.endswith(("lora_A", "lora_B", "lora_magnitude_vector")):
                    fully_shard(sub, mesh=mesh)
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state_dict(model) -> dict:
    """The whole (unsharded) state of an FSDP2 model, on the CPU: every rank must call it (it all-gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local_parameter_bytes(model) -> int:
    """Parameter bytes this rank holds: a sharded parameter counts its local shard only."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


class RankSlices:
    """A data loader whose batches are this rank's contiguous 1/world slice of the global micro-batch. The
    global batches come in the same seeded order on every rank, so together the ranks compute exactly the
    step one worker would. A batch too small to give every rank a row repeats its rows (a rank never idles,
    and DDP's all-reduce needs every rank's gradient)."""

    def __init__(self, loader, rank: int, size: int):
        self.loader, self.rank, self.size = loader, rank, size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield slice_batch(batch, self.rank, self.size)


def slice_batch(batch: dict, rank: int, size: int) -> dict:
    """This rank's rows of a collated batch; the token and sequence counts are recounted from its rows."""
    if "chunks" in batch or "position_ids" in batch:  # refused before any trial (trainers/validate.py)
        raise ValueError("packed sft steps do not split across workers: set train.packing=false or train.workers=1")
    rows = next(v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0)
    per = -(-rows // size)  # ceil
    index = torch.arange(rank * per, (rank + 1) * per) % rows
    return {k: v[index] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows else v
            for k, v in batch.items() if k not in ("token_count", "sequence_count")}


def reduce(values: dict, op: str) -> dict:
    """Every rank's figures combined ("max": peak memory, "sum": tokens/s, "mean": loss); None stays None."""
    import torch.distributed as dist

    if world()[1] == 1:
        return values
    keys = sorted(k for k, v in values.items() if v is not None)
    # NCCL reduces only tensors on the GPU; gloo on the CPU
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        t /= world()[1]
    return {**values, **dict(zip(keys, t.tolist()))}
