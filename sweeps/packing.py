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


def resources_fn(cluster, plan):
    """Per-trial Ray resources: fixed, or the plan's GPU share when gpus_per_trial is auto (a trial with
    sampled keys, whose memory the plan could not know, is sized when Ray draws it)."""
    if cluster.gpus_per_trial != "auto":
        fixed = {"cpu": cluster.cpus_per_trial, "gpu": cluster.gpus_per_trial}
        if cluster.gpus_per_trial or cluster.address:  # a cluster's nodes declare no host-memory resource
            return fixed
        capacity = host_memory_mb()
        # CPU trials on this machine reserve their predicted peak RSS (the plan's, per arm): a sweep whose
        # arms differ 5x in memory runs the big ones apart instead of letting two of them exhaust the machine
        return lambda config: {**fixed, HOST_MEMORY_RESOURCE: min(capacity,
                                                                   int(1024 * plan.predicted_host_gb(config["arm"])))}
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
