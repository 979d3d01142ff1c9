"""peftsweep: sweep | plan | trial | report | promote | serve-set | export | ui. Arguments after the command are
Hydra overrides."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import warnings

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
# deprecation notes from inside transformers/peft, about calls peftsweep does not make itself
warnings.filterwarnings("ignore", category=FutureWarning)

EXIT_CONFIG = 2


def _fail(message: str, code: int = EXIT_CONFIG) -> int:
    for line in str(message).splitlines() or ["(no message)"]:
        print(f"peftsweep: error: {line}", file=sys.stderr)
    return code


def _load(overrides, store: bool = False):
    """The config; with `store`, also refused (one line, exit 2) when its tracking store cannot be reached or
    opened now: commands that read or write the store must not start on one that is not there."""
    from sweeps.config import load

    cfg = load(overrides)
    if store:
        from sweeps.runner import check_store

        check_store(cfg)
    return cfg


def _summary(cfg, sweep_id: str) -> str:
    from evaluation.runs import sweep_metric, trial_table
    from trainers.tracking import client, find_parent

    c = client(cfg.trial.tracking)
    parent = find_parent(c, cfg.trial.tracking.experiment, sweep_id)
    trials = trial_table(c, parent)
    # the sweep's own metric: `--resume` without the sweep's task=... on the command line still shows it
    metric = sweep_metric(parent, trials, cfg.trial.task.metric)
    cols = ["arm", "seed", "status", f"val_{metric}", f"test_{metric}", "peak_host_rss_gb", "train_time_s",
            "trainable_params"]
    cols = [c for c in cols if c in trials]
    return trials[cols].to_string(index=False, float_format=lambda x: f"{x:.4g}")


def cmd_plan(args) -> int:
    from sweeps.plan import build_plan

    cfg = _load(args.overrides)
    plan = build_plan(cfg)
    packing = cfg.cluster.gpus_per_trial == "auto"
    print(f"Sweep {cfg.name}: {len(plan.trials)} trials, all valid (metric {cfg.metric}, "
          f"searcher {cfg.searcher.name}, scheduler {cfg.scheduler.name}), in start order; memory is host RSS "
          "on CPU, allocated VRAM on CUDA:")
    width = max(44, *(len(t.arm) for t in plan.trials))
    spans = any(t.workers > 1 for t in plan.trials)  # memory is then per worker
    print(f"{'#':>3}  {'arm':{width}s} {'seed':>4} {'modules':>7} {'trainable':>12} {'trainable %':>11} "
          f"{'pred. peak GB':>13}  device" + ("   workers x strategy" if spans else "")
          + ("   GPU share (pred. GB on CUDA)" if packing else ""))
    for i, t in enumerate(plan.trials):
        line = (f"{i:3d}  {t.arm:{width}s} {t.seed:4d} {t.targets or 'all':>7} {t.trainable:12,d} "
                f"{100 * t.trainable / t.total:11.3f} {t.predicted_gb:13.2f}  {t.device}")
        if spans:
            line += f"   {t.workers} x {t.strategy}"
        if packing:
            line += f"   {t.gpu_share:.2f} ({t.predicted_gpu_gb:.1f})"
        print(line)
    if spans:
        print("\nA trial on N workers: memory figures are one worker's (each computes 1/N of every batch; FSDP "
              "also shards weights, gradients and optimizer state N ways).")
    if packing:
        shares = [t.gpu_share for t in plan.trials]
        per_gpu = max(1, int(1 / max(shares) + 1e-9))
        print(f"\nPacking: GPU shares sum to {sum(shares):.2f}; at least {per_gpu} of the largest trials fit one GPU "
              f"({cfg.cluster.gpu_memory_gb or 'local'} GB x {cfg.cluster.gpu_headroom} headroom).")
    if cfg.search.racing:
        from sweeps.plan import worst_case

        most = worst_case(cfg, plan)
        shape = (f"{len(plan.arms)} arms x {cfg.search.max_seeds}" if most == len(plan.arms) * cfg.search.max_seeds
                 else f"{len(plan.arms) - 1} arms x {cfg.search.max_seeds} + the base arm once")
        print(f"\nSeed racing: every arm's first seed, then more only for arms still open that seeds can settle, up "
              f"to search.max_seeds={cfg.search.max_seeds}: at most {most} trials ({shape}); "
              f"{len(plan.trials)} if the first round settles every arm.")
    from evaluation.verdicts import sizing

    # before anything is spent: can these rows tell arms apart at the margin the verdicts will use?
    print("\n" + "\n".join(sizing(cfg.trial.task, cfg.trial.task.metric, cfg.report.margin)))
    return 0


def cmd_trial(args) -> int:
    """One trial from the sweep's config tree (search, scheduler and cluster are ignored), without Ray."""
    from trainers.__main__ import run

    return run(_load(args.overrides, store=True).trial, args.json)


def cmd_sweep(args) -> int:
    from sweeps.runner import resume_sweep, run_sweep

    if args.resume and "=" in args.resume:  # `--resume key=value`: an override, not a sweep id
        args.overrides.insert(0, args.resume)
        args.resume = ""
    cfg = _load(args.overrides)
    out = resume_sweep(cfg, args.resume or None) if args.resume is not None else run_sweep(cfg)
    print(f"\nSweep {out['sweep_id']}: {out['n_trials']} trials, {out['n_errors']} errored. "
          f"MLflow parent run {out['parent_run_id']} in experiment {cfg.trial.tracking.experiment!r}.")
    print(_summary(cfg, out["sweep_id"]))
    return 0


def cmd_report(args) -> int:
    from evaluation.report import build_report
    from trainers.tracking import client

    cfg = _load([*args.overrides, *([f"report.margin={args.margin}"] if args.margin is not None else [])],
                store=True)
    out = build_report(client(cfg.trial.tracking), cfg.trial.tracking.experiment, args.sweep,
                       cfg.trial.task.metric, out_dir=args.out, price_per_hour=args.price_per_hour,
                       margin=cfg.report.margin)
    if args.format == "json":  # for scripts: stdout carries the JSON alone
        print(json.dumps(out["json"], indent=1))
        return 0
    print(out["markdown"])
    print(f"Report written to {out['dir']}/ (report.md, report.html, pareto.png, heatmap_rank_modules.png, "
          f"report.json) and logged to parent run {out['parent_run_id']} under report/.")
    return 0


def cmd_promote(args) -> int:
    from evaluation.promote import PromotionRefused, promote
    from trainers.tracking import absolute_uri, client

    flags = {"rule": args.rule, "max_delta": args.max_delta, "memory_budget_gb": args.memory_budget_gb,
             "within_points": args.within_points, "cost": args.cost}
    cfg = _load([*args.overrides, *(f"promote.{k}={v}" for k, v in flags.items() if v is not None)], store=True)
    uri = absolute_uri(cfg.trial.tracking.uri)
    try:
        out = promote(client(cfg.trial.tracking), uri, cfg.trial.tracking.experiment, args.sweep, cfg.promote,
                      cfg.trial.task.metric, margin=cfg.report.margin)
    except PromotionRefused as exc:
        return _fail(f"promotion refused: {exc}", 1)
    print(f"Promoted {out['arm']} (run {out['run_id']}) as {out['name']} version {out['version']}, "
          f"alias @{out['alias']}: {out['reason']}.")
    from trainers.record import metric_scale

    scale = metric_scale(out["metric"])
    print(f"Reload check (fresh process): {out['uri']} reproduces test {out['metric']} "
          f"{scale * out['reproduced']:.2f} (logged {scale * out['logged']:.2f}); "
          f"{out['delta_vs_full_ft_pts']:+.2f} pts vs full FT.")
    base = out["base"]
    print(f"Base model: {base['path']}" + (f" sha256 {base['sha256'][:16]}…" if base["sha256"] else "")
          + (f" revision {base['revision']}" if base["revision"] else ""))
    if "merge_damage_pts" in out:
        print(f"Merged into the full-precision base: test {out['metric']} "
              f"{scale * out['merged_fp_test_' + out['metric']]:.2f} ({out['merge_damage_pts']:+.2f} pts lost)")
    return 0


def cmd_serve_set(args) -> int:
    from evaluation.adapter_set import SetRefused, build_set
    from trainers.tracking import absolute_uri, client

    cfg = _load(args.overrides, store=True)
    try:
        out = build_set(client(cfg.trial.tracking), absolute_uri(cfg.trial.tracking.uri),
                        cfg.trial.tracking.experiment, args.adapter, args.name, args.alias, args.base)
    except SetRefused as exc:
        return _fail(f"adapter set refused: {exc}", 1)
    print(f"Registered {out['name']} version {out['version']}, alias @{out['alias']}: "
          f"{len(out['adapters'])} adapters on one base ({out['base']}):")
    for name, uri in out["adapters"]:
        print(f"  {name:24s} {uri}  (fresh-process check: {100 * out['agreement'][name]:.0f} % of its first test "
              f"rows as its run logged them)")
    print(f"Serve it: mlflow models serve -m {out['uri']} --env-manager local --host 127.0.0.1 --port 5001\n"
          "A request names the adapter per row (an `adapter` column) or for all rows (params), `__base__` for "
          "the untouched base:\n"
          "  curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d '{\"dataframe_records\": "
          f"[{{\"text\": \"...\", \"adapter\": \"{out['adapters'][0][0]}\"}}]}}'")
    return 0


def cmd_export(args) -> int:
    from evaluation.adapter_set import SetRefused
    from evaluation.export import export
    from trainers.tracking import absolute_uri, client

    cfg = _load(args.overrides, store=True)
    try:
        out = export(client(cfg.trial.tracking), absolute_uri(cfg.trial.tracking.uri), args.adapter, args.format,
                     args.dir, args.base)
    except SetRefused as exc:
        return _fail(f"export refused: {exc}", 1)
    if out["format"] == "vllm":
        print(f"{len(out['adapters'])} adapters written for vLLM under {out['dir']}/ (base {out['base']}). Serve them "
              f"from one base (also in {out['dir']}/vllm_serve.sh):\n{out['command']}")
        return 0
    from trainers.record import metric_scale

    for name, m in out["adapters"].items():
        scale = metric_scale(m["metric"])
        print(f"{name}: merged weights and tokenizer in {m['dir']}/ (plain transformers). Merge damage check: "
              f"test {m['metric']} {scale * m['merged_fp_test_' + m['metric']]:.2f} merged vs "
              f"{scale * m['adapter']:.2f} as an adapter ({m['merge_damage_pts']:+.2f} pts lost)")
    return 0


def ui_links(cfg, base: str) -> dict:
    """Pages of the newest sweep in the MLflow UI: its runs, the side-by-side comparison of its trials, and
    the report logged to its parent run. Empty when the store holds no sweep yet."""
    import urllib.parse

    from trainers.tracking import child_runs, client, find_parent

    c = client(cfg.trial.tracking)
    try:
        parent = find_parent(c, cfg.trial.tracking.experiment)
    except LookupError:
        return {}
    exp = parent.info.experiment_id
    runs = [r.info.run_id for r in child_runs(c, exp, parent.info.run_id)]
    query = urllib.parse.quote(json.dumps(runs, separators=(",", ":")), safe="")
    return {"sweep": parent.data.tags.get("peftsweep.sweep_id", parent.info.run_name),
            "runs": f"{base}/#/experiments/{exp}/runs",
            "compare": f"{base}/#/compare-runs?runs={query}&experiments=%5B%22{exp}%22%5D",
            "report": f"{base}/#/experiments/{exp}/runs/{parent.info.run_id}/artifacts/report/report.html"}


class _UiStopped(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop_server(server: subprocess.Popen, grace_s: float = 15.0) -> None:
    """End the MLflow server and everything it started: its process group (it was started in a session of
    its own) and every descendant found now, in case one left the group. SIGTERM, then SIGKILL for what is
    left after `grace_s`. Signalling only `mlflow server` itself leaves its uvicorn worker and job runners
    running, holding the port."""
    import psutil

    try:
        procs = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for proc in procs:
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass
        _, procs = psutil.wait_procs(procs, timeout=grace_s if sig == signal.SIGTERM else 5.0)
        if not procs:
            break
    try:
        server.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def cmd_ui(args) -> int:
    from trainers.tracking import absolute_uri

    cfg = _load(args.overrides, store=True)
    uri = absolute_uri(cfg.trial.tracking.uri)
    base = f"http://{args.host}:{args.port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port), "--workers", "1"]  # one worker: ~1 GB less memory
    print(f"MLflow UI on {base} (store {uri}); Ctrl-C stops it.")
    links = ui_links(cfg, base)
    if links:
        print(f"Newest sweep {links['sweep']}:\n  compare its trials: {links['compare']}\n"
              f"  report:             {links['report']}\n  runs:               {links['runs']}", flush=True)
    stopping: list[int] = []

    def stop(signum, frame):
        if not stopping:  # a second signal while the server shuts down must not cut the shutdown short
            stopping.append(signum)
            raise _UiStopped(signum)

    # Its own session: a terminal's Ctrl-C reaches the wrapper only, and the server's whole group (uvicorn
    # worker, job runners) can be ended as one, whichever signal stops the command.
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {sig: signal.signal(sig, stop) for sig in signals}
    server = None
    try:
        server = subprocess.Popen(cmd, start_new_session=True)
        if args.open and links:
            import threading
            import webbrowser

            threading.Timer(5.0, webbrowser.open, [links["compare"]]).start()  # once the server answers
        return server.wait()
    except _UiStopped as exc:
        print(f"\npeftsweep: {exc}: stopping the MLflow server", file=sys.stderr, flush=True)
        return 128 + exc.signum
    finally:
        stopping.append(0)
        if server is not None:
            _stop_server(server)  # also when the server ended by itself: its workers may not have
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftsweep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sweep", help="validate, then run the sweep on Ray Tune with MLflow tracking")
    p.add_argument("--resume", nargs="?", const="", metavar="SWEEP_ID",
                   help="finish an interrupted sweep (default: the newest) without re-running finished trials")
    p.set_defaults(fn=cmd_sweep)
    p = sub.add_parser("plan", help="expand and validate every trial without training")
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("trial", help="run one trial of the config tree in this process, without Ray")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line")
    p.set_defaults(fn=cmd_trial)
    p = sub.add_parser("report", help="compare every arm with the full-FT arm")
    p.add_argument("--sweep", help="sweep id (default: the newest sweep)")
    p.add_argument("--out", default="reports", help="output folder")
    p.add_argument("--price-per-hour", type=float, default=0.0,
                   help="price of one device-hour (GPU or CPU slot) for the cost column")
    p.add_argument("--margin", type=float, help="how close to full FT counts as close enough (points; "
                   "the metric's units for a loss): the verdicts' margin (default report.margin)")
    p.add_argument("--format", choices=["markdown", "json"], default="markdown",
                   help="what to print (files of every format are written either way)")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("promote", help="register the winning adapter and set the alias")
    p.add_argument("--sweep", help="sweep id (default: the newest sweep)")
    p.add_argument("--rule", choices=["best", "cheapest_within", "best_under_budget"])
    p.add_argument("--max-delta", type=float, help="refuse if the winner trails full FT by more points")
    p.add_argument("--within-points", type=float, help="cheapest_within: allowed distance below full FT")
    p.add_argument("--cost", choices=["peak_mem", "device_hours"], help="cheapest_within: what cheapest means")
    p.add_argument("--memory-budget-gb", type=float, help="best_under_budget: peak memory the adapter must fit")
    p.set_defaults(fn=cmd_promote)
    p = sub.add_parser("serve-set", help="register several adapters of one base as one servable model")
    p.add_argument("-a", "--adapter", action="append", default=[], metavar="[NAME=]models:/MODEL@ALIAS",
                   help="an adapter (or models:/MODEL/VERSION), repeated; default: every @champion of one base")
    p.add_argument("--base", help="with no --adapter: the base whose champions to take (path, name or hash prefix)")
    p.add_argument("--name", help="registered name of the set (default: <base model name>-set)")
    p.add_argument("--alias", default="champion", help="alias moved to the new version once its check passes")
    p.set_defaults(fn=cmd_serve_set)
    p = sub.add_parser("export", help="write registered adapters for vLLM, or merged into their base")
    p.add_argument("--format", choices=["vllm", "merged"], required=True)
    p.add_argument("dir", help="a new (or empty) folder")
    p.add_argument("-a", "--adapter", action="append", default=[], metavar="[NAME=]models:/MODEL@ALIAS",
                   help="an adapter (or models:/MODEL/VERSION), repeated; default: every @champion of one base")
    p.add_argument("--base", help="with no --adapter: the base whose champions to take (path, name or hash prefix)")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("ui", help="MLflow UI on the tracking store")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--open", action="store_true", help="open the newest sweep's comparison in a browser")
    p.set_defaults(fn=cmd_ui)
    for name, action in sub.choices.items():
        action.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. search=tiny method.r=16")
    args = parser.parse_args(argv)

    from sweeps.runner import SweepStopped
    from trainers.config import ConfigError

    try:
        return args.fn(args)
    except ConfigError as exc:
        return _fail(exc)
    except LookupError as exc:
        return _fail(exc, 1)
    except SweepStopped as exc:  # every run is closed; Ray Tune saved the experiment state
        return _fail(f"sweep {exc}: its runs are closed; continue it with `peftsweep sweep --resume`",
                     128 + exc.signum)
    except KeyboardInterrupt:
        return _fail("interrupted" + (": `peftsweep sweep --resume` closes any run left open and continues the "
                                      "sweep" if args.command == "sweep" else ""), 130)


def run() -> None:
    """The `peftsweep` command: main(), then exit without tearing down the interpreter. Once a sweep has
    closed its runs and stopped Ray, unloading torch, transformers, Ray and MLflow writes nothing and took
    ~2.2 s of every sweep's wall time on 2 cores; the atexit handlers still run."""
    from trainers.__main__ import exit_now

    exit_now(main())


if __name__ == "__main__":
    run()
