"""Memory-aware GPU packing on logical GPUs (ray.init(num_gpus=N) on a CPU box): each trial asks for the GPU
share its predicted peak needs, Ray places it, and no GPU ever holds more predicted memory than it has."""
import pytest
from mlflow.tracking import MlflowClient

from sweeps.cli import main
from sweeps.config import load, trial_dict
from sweeps.packing import STEP, gpu_fraction, trial_gpu_request
from sweeps.space import expand
from tests.conftest import tiny_overrides
from tests.test_e2e import _sweep
from trainers import record


def test_fraction_rounds_up_to_the_step_and_never_under_reserves():
    assert gpu_fraction(9.0, 80, 0.9) == pytest.approx(0.15)  # 9 / 72 = 0.125 → 0.15
    assert gpu_fraction(36.0, 80, 0.9) == pytest.approx(0.5)
    for pred in (0.3, 7.7, 20.0, 71.9):
        f = gpu_fraction(pred, 80, 0.9)
        assert f * 80 * 0.9 >= pred and round(f / STEP, 6).is_integer()


def test_a_trial_that_cannot_fit_one_gpu_is_refused_at_plan_time(capsys):
    code = main(["plan", "search=tiny", "cluster.gpus_per_trial=auto", "cluster.gpu_memory_gb=0.05"])
    err = capsys.readouterr().err
    assert code == 2 and "does not fit one GPU" in err


@pytest.mark.slow
def test_trials_pack_onto_logical_gpus_by_predicted_memory(tiny_bert, store):
    overrides = ["search=tiny", "search.full_ft_arm=false", "search.space.method.r=[2,4,8]", "search.seeds=[0,1]",
                 "train.max_steps=6", *tiny_overrides(tiny_bert, store)]
    cfg = load(overrides)
    cfg.cluster.gpu_memory_gb = 1.0
    predicted = max(trial_gpu_request(t, cfg.cluster)[1] for t in expand(cfg.search, trial_dict(cfg)))
    capacity = predicted / (0.9 * 0.43)  # → every trial asks for 0.45 of a GPU: two fit, three do not
    _sweep(store, [*overrides, "cluster.num_gpus=2", "cluster.num_cpus=4", "cluster.gpus_per_trial=auto",
                   f"cluster.gpu_memory_gb={capacity}"])
    c = MlflowClient(store["uri"])
    runs = [r for r in c.search_runs([c.get_experiment_by_name("peftsweep").experiment_id])
            if r.data.tags.get(record.ROLE) == "trial"]
    assert len(runs) == 6 and all(r.data.tags[record.STATUS] == "ok" for r in runs)
    assert all(float(r.data.tags[record.GPU_SHARE]) == pytest.approx(0.45) for r in runs)
    gpus = {r.data.tags[record.CUDA_VISIBLE_DEVICES] for r in runs}
    assert gpus <= {"0", "1"} and len(gpus) == 2, gpus  # one GPU id per trial, both GPUs used
    peak_shared = 0
    for gpu in gpus:  # at no instant do trials on one GPU reserve more than it holds
        spans = [(r.info.start_time, r.info.end_time, float(r.data.tags[record.GPU_SHARE]))
                 for r in runs if r.data.tags[record.CUDA_VISIBLE_DEVICES] == gpu]
        for start, _, _ in spans:
            reserved = sum(share for s, e, share in spans if s <= start < e)
            assert reserved <= 1.0 + 1e-9, (gpu, reserved)
            peak_shared = max(peak_shared, sum(1 for s, e, _ in spans if s <= start < e))
    assert peak_shared == 2, "two trials shared a GPU at once (packing), never three"


def test_cpu_trials_on_this_machine_reserve_their_predicted_memory(tiny_llama):
    """A local CPU sweep asks Ray for each arm's predicted peak RSS of a host-memory resource the node declares
    (85 % of the machine), so two big trials are never started side by side; a cluster's nodes declare none."""
    from sweeps.packing import HOST_MEMORY_RESOURCE, host_memory_mb, resources_fn
    from sweeps.plan import build_plan

    cfg = load(["task=bbc_headlines", "search=sft", f"model.path={tiny_llama}", "model.name=tiny-llama"])
    plan = build_plan(cfg)
    ask = resources_fn(cfg.cluster, plan)
    requests = {arm: ask({"arm": arm, "seed": 0}) for arm in plan.arms}
    for arm, request in requests.items():
        # the prediction rounded up to a GB: arms of one model can share a process (reuse_processes)
        predicted_mb = 1024 * plan.predicted_host_gb(arm)
        assert predicted_mb <= request[HOST_MEMORY_RESOURCE] < predicted_mb + 1024 or \
            request[HOST_MEMORY_RESOURCE] == host_memory_mb()
        assert request[HOST_MEMORY_RESOURCE] % 1024 == 0 or request[HOST_MEMORY_RESOURCE] == host_memory_mb()
        assert request["cpu"] == 1
    assert plan.predicted_host_gb("base") < plan.predicted_host_gb("dora-all_linear-lr0.001")
    assert requests["base"][HOST_MEMORY_RESOURCE] <= requests["dora-all_linear-lr0.001"][HOST_MEMORY_RESOURCE]
    cfg.cluster.address = "ray://head:10001"
    assert HOST_MEMORY_RESOURCE not in resources_fn(cfg.cluster, plan)
    # the default sweep's arms (one MiniLM, full FT and six LoRAs) ask alike: any slot's process can run any
    default = build_plan(load([]))
    ask = resources_fn(load([]).cluster, default)
    assert len({ask({"arm": arm, "seed": 0})[HOST_MEMORY_RESOURCE] for arm in default.arms}) == 1
