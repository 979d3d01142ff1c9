"""Does the sweep's answer survive a rerun? The same sweep started from different seeds (search.seeds=[S], racing
as configured), each judged as `peftsweep report` and `promote` judge it: which arm `best` promotes, the
validation tie set it picks from, and every adapter arm's verdict against full FT on test.

    python bench/stability.py                      # sweeps from seeds 0, 10, 20 in ./ (sqlite store), then judge
    python bench/stability.py --seeds 0,10,20 task=... model=...   # any sweep overrides after the options

A sweep already in the store that started from one of the seeds (same search, task and model) is reused, not
rerun: after `make demo` (seed 0) only seeds 10 and 20 run. Prints each run's verdict table, then the two
checks: every champion lies in the other runs' tie sets, and every adapter arm's verdict agrees in at least
2 of 3 runs. Exit status 0 whether or not they pass: this measures, it does not gate.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from collections import Counter
from pathlib import Path

BIN = Path(sys.executable).parent


def sweeps_by_first_seed(client, experiment: str, overrides: list[str]) -> dict[int, object]:
    """{first seed: newest finished parent run} for sweeps whose search, task and model match the config."""
    from sweeps.config import load
    from trainers import record

    cfg = load(overrides)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    found = {}
    for run in client.search_runs([exp.experiment_id], filter_string=f"tags.`{record.ROLE}` = 'sweep'",
                                  order_by=["attributes.start_time DESC"], max_results=200):
        p = run.data.params
        if (run.info.status == "FINISHED" and p.get("search") == cfg.search.name and p.get("task") == cfg.trial.task.name
                and p.get("model") == cfg.trial.model.name and p.get("seeds")):
            found.setdefault(int(p["seeds"].split(",")[0]), run)
    return found


def judge(client, parent, margin: float) -> dict:
    """What report and promote say of one sweep: champion, validation tie set, test verdicts vs full FT."""
    from evaluation.promote import choose
    from evaluation.runs import seeds_by_arm, sweep_metric, trial_table
    from evaluation.verdicts import ADAPTER_METHODS_EXCLUDED, decide

    trials = trial_table(client, parent)
    metric = sweep_metric(parent, trials, parent.data.params.get("metric", "val_accuracy").split("_", 1)[1])
    decision = decide(client, trials, metric, margin)
    winner = choose(trials, metric, "best", decision=decision)
    adapters = sorted(set(trials[~trials["method"].isin(ADAPTER_METHODS_EXCLUDED)]["arm"]))
    return {"sweep": parent.data.params["sweep_id"], "best": decision.best.get("val"), "trials": len(trials), "champion": winner.arm["arm"],
            "reason": winner.reason, "ties": decision.ties.get("val", []), "vs_full": decision.vs_full.get("test", {}),
            "adapters": adapters, "seeds": seeds_by_arm(trials), "metric": metric,
            "vs_best": decision.vs_best.get("val", {}), "noise": decision.seed_noise.get("val")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,10,20", help="first seed of each run")
    ap.add_argument("--margin", type=float, default=None, help="default: report.margin of the config")
    args, overrides = ap.parse_known_args(argv)
    from mlflow.tracking import MlflowClient
    from sweeps.config import load
    from trainers.tracking import client as tracking_client

    cfg = load(overrides)
    margin = cfg.report.margin if args.margin is None else args.margin
    client = tracking_client(cfg.trial.tracking)
    wanted = [int(s) for s in args.seeds.split(",")]
    for seed in wanted:
        if seed in sweeps_by_first_seed(client, cfg.trial.tracking.experiment, overrides):
            print(f"seed {seed}: a finished sweep is in the store; reused", flush=True)
            continue
        print(f"seed {seed}: peftsweep sweep search.seeds=[{seed}] {' '.join(overrides)}", flush=True)
        subprocess.run([str(BIN / "peftsweep"), "sweep", f"search.seeds=[{seed}]", *overrides], check=True)
    runs = sweeps_by_first_seed(client, cfg.trial.tracking.experiment, overrides)
    judged = {seed: judge(client, runs[seed], margin) for seed in wanted}

    for seed, j in judged.items():
        print(f"\n## First seed {seed}: sweep {j['sweep']}, {j['trials']} trials\n")
        print(f"Champion: {j['champion']} ({j['reason']})")
        print(f"Validation tie set: {', '.join(j['ties'])}")
        noise = j["noise"]
        print(f"Seed noise (validation): {noise.source}" + (f", {noise.sd:.2f} for one seed's difference, {noise.df:g} df"
                                                          if noise is not None and noise.sd is not None else "") + "\n")
        print(f"| arm | seeds | Δ {j['metric']} vs best on validation | Δ {j['metric']} vs full FT on test | verdict |")
        print("|---|---|---|---|---|")

        def shown(c) -> str:
            return f"{c.mean:+.2f} [{c.low:+.2f}, {c.high:+.2f}]" if c else "–"

        for arm in j["adapters"]:
            c = j["vs_full"].get(arm)
            print(f"| {arm} | {','.join(map(str, j['seeds'].get(arm, [])))} | "
                  f"{shown(j['vs_best'].get(arm)) if arm != j['best'] else 'best'} | {shown(c)} | "
                  f"{c.verdict if c else '–'} |")

    print("\n## Stability\n")
    champions_ok = True
    for seed, j in judged.items():
        others = [o for s, o in judged.items() if s != seed]
        inside = [j["champion"] in o["ties"] for o in others]
        champions_ok &= all(inside)
        print(f"- champion of seed {seed} ({j['champion']}) in the other runs' tie sets: "
              f"{sum(inside)} of {len(others)}")
    arms = sorted(set().union(*(j["adapters"] for j in judged.values())))
    verdicts_ok = True
    for arm in arms:
        said = [j["vs_full"][arm].verdict if arm in j["vs_full"] else "none" for j in judged.values()]
        top, count = Counter(said).most_common(1)[0]
        agree = count >= min(2, len(said))
        verdicts_ok &= agree
        print(f"- {arm}: {', '.join(said)} -> {'agree' if agree else 'DISAGREE'} ({count} of {len(said)} say {top})")
    print(f"\nEvery champion in every other run's tie set: {'yes' if champions_ok else 'no'}. "
          f"Every adapter arm's verdict agrees in >= 2 of {len(judged)}: {'yes' if verdicts_ok else 'no'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
