"""Memory-aware GPU packing: `cluster.gpus_per_trial=auto` asks Ray for the share of a GPU that each trial's
predicted peak memory needs. Ray never places fractional GPU requests summing past 1.0 on one GPU, so trials
share a GPU only when their predicted peaks fit it together: packing by prediction, not by luck."""
from __future__ import annotations

import math

from trainers.config import ConfigError, trial_config_from_dict

# Fractions are rounded up to this grid: finer steps buy little and make Ray's accounting noisy.
STEP = 0.05
# Each process on a GPU also holds a CUDA context outside the allocator's figures.
CUDA_CONTEXT_GB = 0.5


def gpu_capacity_gb(cluster) -> float:
    if cluster.gpu_memory_gb:
        return float(cluster.gpu_memory_gb)
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 1024 ** 3
    raise ConfigError("cluster.gpus_per_trial=auto needs cluster.gpu_memory_gb (no local GPU to read it from)")


def gpu_fraction(predicted_gb: float, capacity_gb: float, headroom: float) -> float:
    """The GPU share a trial asks for; > 1 means it cannot fit one GPU (refused at plan time)."""
    return math.ceil(predicted_gb / (capacity_gb * headroom) / STEP - 1e-9) * STEP


def trial_gpu_request(trial: dict, cluster) -> tuple[float, float]:
    """(fraction, predicted GB) for one resolved trial dict, predicted as it would run on CUDA."""
    from trainers.estimate import predict_trial

    cfg = trial_config_from_dict(trial)
    cfg.train.device = "cuda"  # what the trial will be on; meta-device prediction needs no GPU here
    predicted = predict_trial(cfg, validate_device=False)["predicted_gb"] + CUDA_CONTEXT_GB
    return gpu_fraction(predicted, gpu_capacity_gb(cluster), cluster.gpu_headroom), predicted


def uses_gpus(cluster) -> bool:
    return cluster.gpus_per_trial == "auto" or bool(cluster.gpus_per_trial)


def workers_available(cluster) -> int:
    """Workers one trial may span: cluster.max_workers_per_trial, else local Ray's GPUs (or this machine's),
    or on CPU its cores over cpus_per_trial."""
    if cluster.max_workers_per_trial:
        return cluster.max_workers_per_trial
    if uses_gpus(cluster):
        import torch

        return cluster.num_gpus or torch.cuda.device_count() or 1
    import os

    return max(1, int((cluster.num_cpus or os.cpu_count() or 1) // cluster.cpus_per_trial))


def worker_capacity_gb(cluster, workers: int) -> float:
    """Memory one worker may plan to: a GPU's (with headroom), or on CPU its share of this machine's."""
    if uses_gpus(cluster):
        return gpu_capacity_gb(cluster) * cluster.gpu_headroom
    return host_memory_mb() / 1024 / workers


def per_worker_gb(cfg, cluster, workers: int) -> float:
    """Predicted peak of one worker of `workers`, on the device the trials use (CUDA adds its context)."""
    import dataclasses

    from trainers.estimate import predict_trial

    if uses_gpus(cluster):
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="cuda"))
        return predict_trial(cfg, validate_device=False, workers=workers)["predicted_gb"] + CUDA_CONTEXT_GB
    return predict_trial(cfg, workers=workers)["predicted_gb"]


def choose_workers(cfg, cluster) -> tuple[int, str | None]:
    """train.workers=auto: (the fewest workers whose predicted per-worker peak fits one device, None), or
    (0, why not) when every available count is too few, naming the count that would fit. A count must divide
    train.batch_size (each worker computes an equal slice of every micro-batch)."""
    available = workers_available(cluster)
    counts = [n for n in range(1, cfg.train.batch_size + 1) if cfg.train.batch_size % n == 0]
    fits = next((n for n in counts if per_worker_gb(cfg, cluster, n) <= worker_capacity_gb(cluster, n)), None)
    if fits is not None and fits <= available:
        return fits, None
    need = (f"{fits} workers would fit" if fits else
            f"no worker count dividing train.batch_size={cfg.train.batch_size} fits")
    n = max(c for c in counts if c <= available)
    return 0, (f"predicted {per_worker_gb(cfg, cluster, n):.1f} GB per worker on {n} workers, more than the "
               f"{worker_capacity_gb(cluster, n):.1f} GB each can hold; {need} "
               f"(cluster.max_workers_per_trial={available}), or lower train.batch_size")


HOST_MEMORY_RESOURCE = "host_memory_mb"  # a custom Ray resource of the local node (Ray wants whole numbers)


def host_memory_mb() -> int:
    """What trials may reserve of this machine: 85 % of its memory (the driver, Ray and the page cache
    need the rest), the container's limit where one is set."""
    import psutil

    total = psutil.virtual_memory().total
    try:
        limit = int(open("/sys/fs/cgroup/memory.max").read().strip())
        total = min(total, limit)
    except (OSError, ValueError):  # no cgroup v2 limit ("max") or not Linux
        pass
    return int(0.85 * total / 1024 ** 2)


# A trial on several workers: its Tune process only waits on Ray Train, whose workers reserve the CPUs and GPUs
# (gang-scheduled); it asks for no CPU, so waiting drivers never hold cores (Ray wants some resource: a byte).
DRIVER_ONLY = {"cpu": 0, "memory": 1}


HOST_MEMORY_STEP_MB = 1024


def reserved_host_mb(predicted_gb: float) -> int:
    """A trial's host-memory reservation: its predicted peak, rounded up to HOST_MEMORY_STEP_MB. Tune hands
    a finished trial's process to the next trial only when both ask for exactly the same resources
    (cluster.reuse_processes); to the MB, no two arms ever did (the default sweep's 7 arms predict 1.41-1.57
    GB, and all now ask for 2,048 MB; half-GB steps split them in two). Costs at most 1 GB of
    over-reservation a trial, which matters only where memory, not cores, limits how many run at once."""
    return HOST_MEMORY_STEP_MB * math.ceil(1024 * predicted_gb / HOST_MEMORY_STEP_MB)


def resources_fn(cluster, plan):
    """Per-trial Ray resources: fixed, or the plan's GPU share when gpus_per_trial is auto (a trial with
    sampled keys, whose memory the plan could not know, is sized when Ray draws it); a multi-worker trial's
    Tune process only DRIVER_ONLY."""
    inner = _resources_fn(cluster, plan)
    if all(t.workers == 1 for t in plan.trials):
        return inner
    return lambda config: DRIVER_ONLY if plan.workers(config["arm"]) > 1 else (
        inner(config) if callable(inner) else inner)


def _resources_fn(cluster, plan):
    if cluster.gpus_per_trial != "auto":
        fixed = {"cpu": cluster.cpus_per_trial, "gpu": cluster.gpus_per_trial}
        if cluster.gpus_per_trial or cluster.address:  # a cluster's nodes declare no host-memory resource
            return fixed
        capacity = host_memory_mb()
        # CPU trials on this machine reserve their predicted peak RSS (the plan's, per arm): a sweep whose
        # arms differ 5x in memory runs the big ones apart instead of letting two of them exhaust the machine
        return lambda config: {**fixed, HOST_MEMORY_RESOURCE: min(
            capacity, reserved_host_mb(plan.predicted_host_gb(config["arm"])))}
    cache: dict = {}

    def resources(config: dict) -> dict:
        key = repr(sorted(config.items()))
        if key not in cache:
            drawn = {k: v for k, v in config.items() if k not in ("arm", "seed")}
            fraction = plan.gpu_share(config["arm"]) if not drawn else \
                trial_gpu_request(plan.trial_dict(config["arm"], config["seed"], drawn), cluster)[0]
            cache[key] = {"cpu": cluster.cpus_per_trial, "gpu": min(1.0, fraction)}
        return cache[key]
    return resources
