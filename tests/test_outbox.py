"""A write the store refuses is dropped from the outbox and reported, never left at the head of the queue where
every later write, the run's outcome above all, would wait behind it: a run is never left RUNNING by one
failed write, and the failure reaches the trial with its own error text."""
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tests.test_trial import _cfg
from trainers import record
from trainers.config import TrackingConfig
from trainers.trial import run_trial
from trainers.trial_run import TrackingError


def _artifact_store_in_the_way(store) -> None:
    """A regular file where the artifact folder should be: writes fail, even as root (chmod would not)."""
    from pathlib import Path

    Path(store["artifacts"]).write_text("not a folder")


def test_a_refused_artifact_write_fails_the_trial_with_its_error_and_never_leaves_it_running(tiny_bert, store):
    _artifact_store_in_the_way(store)
    cfg = _cfg(tiny_bert, store)
    cfg.tracking.outage_timeout_s = 3  # were the refusal taken for an outage, the test still ends in seconds
    with pytest.raises(TrackingError, match="NotADirectoryError"):
        run_trial(cfg)
    c = MlflowClient(store["uri"])
    (run,) = c.search_runs([c.get_experiment_by_name("peftsweep").experiment_id])
    assert run.info.status == "FAILED", run.data.tags
    assert run.data.tags[record.STATUS] == "failed"
    assert "NotADirectoryError" in run.data.tags[record.ERROR]
    assert run.data.params["batch_size"] == "8"  # what was written before the refusal is kept


def _recorder(store, tmp_path):
    from trainers.tracking import RunRecorder

    cfg = TrackingConfig(uri=store["uri"], artifact_location=store["artifacts"], outage_timeout_s=3)
    recorder = RunRecorder(cfg, run_name="outbox", params={"p": "1"}, tags={record.ARM: "outbox"})
    adapter = tmp_path / "adapter-src"
    adapter.mkdir()
    (adapter / "weights.txt").write_text("w")
    return recorder, str(adapter)


def test_a_refused_write_is_dropped_and_the_writes_behind_it_still_go_through(store, tmp_path, capsys):
    _artifact_store_in_the_way(store)
    recorder, adapter = _recorder(store, tmp_path)
    recorder.log_metrics({"val_loss": 1.0}, step=1)
    with pytest.raises(NotADirectoryError):
        recorder.log_artifacts(adapter, "adapter")
    # a refusal by the local file system is no outage: nothing is buffered to wait for it
    assert recorder.outbox.outage_since is None and "buffering writes" not in capsys.readouterr().out
    recorder.log_metrics({"val_loss": 0.5}, step=2)
    recorder.finish("failed", "NotADirectoryError: the artifact store refused the adapter")
    assert recorder.outbox.pending == []
    assert len(recorder.outbox.undelivered) == 1 and "NotADirectoryError" in recorder.outbox.undelivered[0]
    c = MlflowClient(store["uri"])
    run = c.get_run(recorder.run_id)
    assert run.info.status == "FAILED" and run.data.tags[record.STATUS] == "failed"
    assert "refused the adapter" in run.data.tags[record.ERROR]
    assert [m.step for m in c.get_metric_history(recorder.run_id, "val_loss")] == [1, 2]


def test_an_ok_outcome_is_not_recorded_over_a_write_that_was_dropped(store, tmp_path):
    """A write that waited out an outage and is then refused at the trial's end: the outcome behind it is
    still written, as failed with the refusal's text, since the run's record is not complete."""
    from mlflow.entities import Param

    recorder, _ = _recorder(store, tmp_path)
    # queued as an outage would leave it: a param that contradicts the one logged (a permanent refusal)
    recorder.outbox.pending.append((recorder._log_batch, ({"params": [Param("p", "2")]},)))
    with pytest.raises(MlflowException, match="Changing param values"):
        recorder.finish("ok")
    assert recorder.outbox.pending == []
    run = MlflowClient(store["uri"]).get_run(recorder.run_id)
    assert run.info.status == "FAILED" and run.data.tags[record.STATUS] == "failed", run.data.tags
    assert "Changing param values" in run.data.tags[record.ERROR]
