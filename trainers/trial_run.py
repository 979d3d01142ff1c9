"""A trial's MLflow run, written by a process of its own.

The trial process never imports MLflow: on 2 cores that is ~2 s of imports and store set-up in a
single-threaded stretch of the trial, and ~150 MB of its RSS. It starts the writer first thing; the writer
creates the run on the other core while the trial loads its data and model, and every write after that is a
line on a pipe, so no write (not even one waiting out a tracking outage) holds up a training step. The writer
runs trainers.tracking's RunRecorder: what a run holds and how its status is written are defined there, once.

If the trial's process dies (killed, OOM-killed), the writer still delivers what it was sent, then leaves the
run RUNNING for whoever owns the trial to close (a sweep marks it killed or pruned: tracking.close_orphans).

    python -m trainers.trial_run FD      the writer; reads requests on stdin, answers on file descriptor FD
"""
from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

from trainers import record
from trainers.config import TrackingConfig
from trainers.tracking import StopTrial, outcome_of, redact


class TrackingError(RuntimeError):
    """What the writer could not record (its message), or the writer process is gone."""


class TrialRun:
    """A trial's child run, as a context manager whose exit records how the trial ended (tracking.outcome_of);
    a no-op when tracking is disabled (the bare baseline)."""

    def __init__(self, cfg: TrackingConfig, run_name: str, params: dict, tags: dict,
                 resume_run_id: str | None = None):
        """`resume_run_id`: a trial continuing from a checkpoint writes on into the run it began (one run)."""
        self.enabled = cfg.enabled
        self.closed = False
        self._run: dict | None = None
        self._open_error: TrackingError | None = None
        if not self.enabled:
            return
        self._writer = _Writer()
        self._opening = self._writer.send("open", reply=True, cfg=dataclasses.asdict(cfg), run_name=run_name,
                                          params=_strings(params), tags=_strings(tags), resume_run_id=resume_run_id)

    def ready(self) -> None:
        """Wait for the run to exist. The writer creates it while the trial sets up; a store that cannot be
        reached (after outage_timeout_s) fails the trial here, before any training is spent."""
        if not self.enabled or self._run is not None:
            return
        if self._open_error is not None:
            raise self._open_error
        try:
            self._run = self._writer.wait(self._opening)
        except TrackingError as exc:
            self._open_error = exc
            raise

    @property
    def run_id(self) -> str | None:
        if not self.enabled:
            return None
        self.ready()
        return self._run["run_id"]

    def log_params(self, params: dict) -> None:
        if self.enabled:
            self._writer.send("params", params=_strings(params))

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        if self.enabled:
            self._writer.send("metrics", metrics={k: float(v) for k, v in metrics.items() if v is not None},
                              step=step, timestamp_ms=int(time.time() * 1000))

    def set_tags(self, tags: dict) -> None:
        if self.enabled:
            self._writer.send("tags", tags={k: str(v) for k, v in tags.items()})

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        """Waits until delivered: the folder is temporary."""
        if self.enabled:
            self._writer.wait(self._writer.send("artifacts", reply=True, local_dir=local_dir,
                                                artifact_path=artifact_path))

    def log_table(self, frame, artifact_file: str) -> None:
        """A table the MLflow UI shows (and compares across runs) in its artifact and evaluation views."""
        if self.enabled:
            self._writer.wait(self._writer.send("table", reply=True, columns=[str(c) for c in frame.columns],
                                                rows=frame.values.tolist(), artifact_file=artifact_file))

    def finish(self, status: str, error: str | None = None) -> None:
        """Record the outcome; returns once every write before it is delivered, so the trial's record is
        complete, or raises TrackingError."""
        self.closed = True
        if not self.enabled:
            return
        try:
            try:
                self.ready()
            except TrackingError:
                if status == "ok":
                    raise
                return  # no run to record the failure in; the trial's own error propagates
            self._writer.wait(self._writer.send("finish", reply=True, status=status, error=error))
        finally:
            self._writer.close()

    def __enter__(self) -> "TrialRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        """Swallows only StopTrial: a scheduler's stop is an outcome (`pruned`), not an error."""
        if self.closed:
            return False
        status, error = outcome_of(exc)
        if isinstance(exc, StopTrial) and self.enabled and self._open_error is None:
            self.set_tags({record.PRUNED_AT_STEP: exc.step})
        self.finish(status, error)
        return status == "pruned"


def _strings(values: dict) -> dict:
    """Params and tags as MLflow stores them: text; an unset param is left out."""
    return {k: str(v) for k, v in values.items() if v is not None}


class _Writer:
    """The trial's end of the pipe: requests go out on the writer's stdin, answers come back on a pipe of
    their own (the writer's stdout and stderr are the trial's, so its outage notices show where the trial's
    output does)."""

    def __init__(self):
        answers_fd, writer_end = os.pipe()
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        # its own session: a Ctrl-C or a signal to the trial's process group is the trial's to record
        self.proc = subprocess.Popen([sys.executable, "-m", "trainers.trial_run", str(writer_end)],
                                     stdin=subprocess.PIPE, pass_fds=(writer_end,), env=env, bufsize=0,
                                     start_new_session=True)
        os.close(writer_end)
        self._answers: dict[int, dict] = {}
        self._failure: str | None = None  # a write that needed no answer and failed
        self._gone = False
        self._cond = threading.Condition()
        self._next_id = 0
        threading.Thread(target=self._read_answers, args=(os.fdopen(answers_fd),), daemon=True).start()

    def _read_answers(self, stream) -> None:
        for line in stream:
            answer = json.loads(line)
            with self._cond:
                if answer.get("id") in self._answers:
                    self._answers[answer["id"]] = answer
                elif "error" in answer and self._failure is None:
                    self._failure = answer["error"]
                self._cond.notify_all()
        with self._cond:
            self._gone = True
            self._cond.notify_all()

    def _dead(self) -> TrackingError:
        code = self.proc.poll()
        return TrackingError(self._failure or f"the tracking writer process ended (exit code {code}); "
                                              "its output above says why")

    def send(self, op: str, reply: bool = False, **payload) -> int:
        with self._cond:
            # after a failed write the outcome still goes out, so the run records why the trial failed
            if self._gone or (self._failure is not None and op != "finish"):
                raise self._dead()
            self._next_id += 1
            msg_id = self._next_id
            if reply:
                self._answers[msg_id] = {}
        try:
            self._write_line((json.dumps({"op": op, "id": msg_id, "reply": reply, **payload}) + "\n").encode())
        except (BrokenPipeError, ValueError):
            raise self._dead() from None
        return msg_id

    def _write_line(self, data: bytes) -> None:
        """The whole line or nothing: a Ctrl-C that lands mid-write (a full pipe) would leave half a request
        for the next one to corrupt, so SIGINT is held until the line is out, then delivered."""
        held: list[int] = []
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum)) if main else None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.proc.stdin.fileno(), view):]
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
                if held:
                    os.kill(os.getpid(), signal.SIGINT)

    def wait(self, msg_id: int) -> dict:
        with self._cond:
            # a request the writer could not read is never answered: its error ends the wait instead
            self._cond.wait_for(lambda: self._answers[msg_id] or self._gone or self._failure is not None)
            answer = self._answers.pop(msg_id)
        if not answer:
            raise self._dead()
        if "error" in answer:
            raise TrackingError(answer["error"])
        return answer

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(timeout=30)  # it has only to exit: its last write was answered
        except subprocess.TimeoutExpired:
            self.proc.kill()


def serve(answers_fd: int) -> None:
    """The writer: one RunRecorder, fed in order. Writes the outbox holds (an outage) are retried every
    second while the trial is quiet; at end of input what is held is delivered before the writer exits."""
    from trainers.tracking import RunRecorder

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    answers = os.fdopen(answers_fd, "w", buffering=1)
    inbox: queue.Queue = queue.Queue()

    def read_requests() -> None:
        try:
            for line in sys.stdin:
                try:
                    inbox.put(dict(json.loads(line)))
                except (ValueError, TypeError):  # the trial is told, rather than left waiting for an answer
                    inbox.put({"op": "unreadable", "id": None, "reply": False, "line": line[:80]})
        finally:
            inbox.put(None)

    threading.Thread(target=read_requests, daemon=True).start()
    recorder, carried = None, _NOTHING
    while True:
        if carried is not _NOTHING:
            msg, carried = carried, _NOTHING
        else:
            try:
                msg = inbox.get(timeout=1.0 if recorder is not None and recorder.outbox.pending else None)
            except queue.Empty:
                msg = {"op": "retry", "id": None, "reply": False}
        if msg is None:
            break
        if msg["op"] == "metrics":  # with every metrics write already waiting behind it: one store write
            msg, carried = _take_metrics(inbox, msg)
        op, msg_id, reply = msg.pop("op"), msg.pop("id"), msg.pop("reply")
        try:
            if op == "open":
                recorder = RunRecorder(TrackingConfig(**msg.pop("cfg")), **msg)
                answer = {"run_id": recorder.run_id}
            else:
                _apply(recorder, op, msg)
                answer = {}
            if reply:
                answers.write(json.dumps({"id": msg_id, **answer}) + "\n")
        except Exception as exc:  # noqa: BLE001 - the trial decides what a failed write means
            answers.write(json.dumps({"id": msg_id, "error": redact(f"{type(exc).__name__}: {exc}")[:2000]}) + "\n")
    if recorder is not None and recorder.outbox.pending:
        try:
            recorder.outbox.flush(wait=True)
        except Exception as exc:  # noqa: BLE001
            print(f"tracking: {len(recorder.outbox.pending)} writes undelivered: {redact(str(exc))[:200]}",
                  file=sys.stderr, flush=True)
    answers.close()
    sys.stdout.flush()
    os._exit(0)  # skip tearing down MLflow's modules: nothing is left to write


_NOTHING = object()  # no request carried over from the last batch (None is the end of input)


def _take_metrics(inbox: queue.Queue, first: dict) -> tuple[dict, object]:
    """`first` and the metrics writes queued right behind it, as one request ({"op": "metrics", "rows": ...}),
    and the request that ended the run of them (or _NOTHING): a trial that validates faster than the store
    commits (one sqlite transaction a write) then never builds a backlog its end would wait for. Order holds:
    only consecutive metrics writes merge, and each keeps its own step and timestamp."""
    rows = [(first["metrics"], first["step"], first["timestamp_ms"])]
    while True:
        try:
            nxt = inbox.get_nowait()
        except queue.Empty:
            nxt = _NOTHING
        if nxt is _NOTHING or nxt is None or nxt.get("op") != "metrics":
            return {"op": "metrics", "id": first["id"], "reply": False, "rows": rows}, nxt
        rows.append((nxt["metrics"], nxt["step"], nxt["timestamp_ms"]))


def _apply(recorder, op: str, msg: dict) -> None:
    if op == "unreadable":
        raise ValueError(f"unreadable tracking request {msg['line']!r}")
    if op == "retry":
        recorder.outbox.flush(wait=False)
    elif op == "params":
        recorder.log_params(msg["params"])
    elif op == "metrics":
        recorder.log_metric_rows(msg["rows"])
    elif op == "tags":
        recorder.set_tags(msg["tags"])
    elif op == "artifacts":
        recorder.log_artifacts(msg["local_dir"], msg["artifact_path"])
    elif op == "table":
        import pandas as pd

        recorder.log_table(pd.DataFrame(msg["rows"], columns=msg["columns"]), msg["artifact_file"])
    elif op == "finish":
        recorder.finish(msg["status"], msg["error"])
    else:
        raise ValueError(f"unknown request {op!r}")


if __name__ == "__main__":
    serve(int(sys.argv[1]))
