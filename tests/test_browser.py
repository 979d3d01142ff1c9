"""What a person sees: `mlflow server` over a finished sweep's store, driven in headless Chromium. The runs page
nests the trials under the sweep's parent run and shows their peak-memory and task-metric columns; the compare
view of the trials shows each trial's name and, on the metric rows, each trial's logged value.

Chromium and ChromeDriver are Debian's (`make system-deps`); a machine without them fails this test."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from sweeps.cli import main
from tests.conftest import BIN
from trainers import record

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Chromium's background connections are refused on the test machines; these keep it off the network.
CHROME_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--window-size=1600,1000"]
METRICS = (record.PEAK_HOST_RSS_GB, record.metric_key("test", "accuracy"))
WAIT_S = 120  # the UI is slow on 2 busy cores
RUN_NAME_CELL = "[col-id='attributes.`Run Name`']"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group the test started, SIGKILL what is left after 30 s."""
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader exited; its children may not have
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(1)


@contextmanager
def _mlflow_server(store, log: Path):
    """`mlflow server` on 127.0.0.1 over the store, in its own process group; yields (base URL, process)."""
    port = _free_port()
    # No job runner: it would start 7 huey consumers on this 2-core machine and leave a folder in /dev/shm.
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                                 "--backend-store-uri", store["uri"], "--artifacts-destination", store["artifacts"],
                                 "--workers", "1"],
                                cwd=store["dir"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        _stop_group(proc)


def _wait_healthy(base: str, proc: subprocess.Popen, log: Path, timeout: float = WAIT_S) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"mlflow server exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"mlflow server did not answer /health within {timeout} s:\n{log.read_text()[-3000:]}")


@contextmanager
def _chromium(tmp: Path):
    assert os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK), \
        f"{CHROMIUM} and {CHROMEDRIVER} are needed: run `make system-deps` (apt-get install chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in [*CHROME_ARGS, f"--user-data-dir={tmp / 'chromium-profile'}"]:
        options.add_argument(arg)
    # An explicit driver path: Selenium Manager never runs (it would try to download a driver).
    service = Service(CHROMEDRIVER, log_output=str(tmp / "chromedriver.log"),
                      popen_kw={"start_new_session": True})
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_page_load_timeout(WAIT_S)
        yield driver
    finally:
        pid = service.process.pid if service.process else None
        try:
            driver.quit()
        finally:
            if pid:  # chromium's own processes live in chromedriver's group: none outlive the test
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _text(driver) -> str:
    try:
        return driver.find_element(By.TAG_NAME, "body").text
    except Exception as e:  # noqa: BLE001
        return f"<no page text: {e}>"


def _wait(driver, what: str, condition, timeout: float | None = None):
    """The condition's first truthy value; on time-out an AssertionError naming `what`, with the page's text."""
    timeout = timeout or WAIT_S
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5,
                             ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
                             ).until(condition)
    except TimeoutException:
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} on {driver.current_url}; "
                             f"the page says:\n{_text(driver)[-3000:]}") from None


def _shown(driver, css: str):
    """The displayed elements matching css (ag-grid renders a row once per pinned/centre container)."""
    return [e for e in driver.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]


def _close_assistant(driver) -> None:
    """MLflow 3 opens its assistant panel on first load; it only hides columns, so close it when it is there."""
    for button in driver.find_elements(By.XPATH, "//*[normalize-space(text())='MLflow Assistant']"
                                                 "/ancestor::*[.//button[@aria-label='Close']][1]"
                                                 "//button[@aria-label='Close']"):
        if button.is_displayed():
            button.click()


def _save(driver, path: Path) -> Path:
    assert driver.save_screenshot(str(path)), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000, \
        f"{path}: {path.stat().st_size} bytes, not a real screenshot"
    return path


# The compare page's metric table is two virtualised grids side by side: metric names, then one column per run.
# Its row for a metric, scrolled into the grid when need be (only ~7 rows are rendered at a time).
_METRIC_LABEL = """
const [name, title] = [arguments[0], arguments[1] || 'Metrics'];
const section = [...document.querySelectorAll('[role=button][aria-expanded]')]
  .find(h => h.innerText.trim() === title)?.parentElement;
if (!section) return null;
const label = [...section.querySelectorAll('.ReactVirtualized__Grid *')]
  .find(e => (e.tagName === 'A' || e.children.length === 0) && e.textContent.trim() === name);
if (label) return label;
const grid = [...section.querySelectorAll('.ReactVirtualized__Grid')]
  .find(g => g.scrollHeight > g.clientHeight && getComputedStyle(g).overflowY !== 'hidden');
if (grid) grid.scrollTop = grid.scrollTop + grid.clientHeight >= grid.scrollHeight ? 0 : grid.scrollTop + 90;
return null;
"""
# The values drawn on the same line as a label, right of it, left to right.
_VALUES_ON_LINE = """
const box = arguments[0].getBoundingClientRect(), y = (box.top + box.bottom) / 2;
return [...document.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > *')]
  .map(c => [c, c.getBoundingClientRect()])
  .filter(([c, b]) => b.left >= box.right - 1 && b.top <= y && y <= b.bottom && c.innerText.trim())
  .sort((p, q) => p[1].left - q[1].left)
  .map(([c]) => c.innerText.trim());
"""


# A row of the compare page's Parameters table (a plain table): the values right of its label, left to right.
_ROW_VALUES = """
const [name, title] = arguments;
const section = [...document.querySelectorAll('[role=button][aria-expanded]')]
  .find(h => h.innerText.trim() === title)?.parentElement;
if (!section) return null;
const leaves = [...section.querySelectorAll('*')].filter(e => e.children.length === 0 && e.textContent.trim());
const label = leaves.find(e => e.textContent.trim() === name);
if (!label) return null;
label.scrollIntoView({block: 'center'});
const box = label.getBoundingClientRect(), y = (box.top + box.bottom) / 2;
return leaves.map(e => [e, e.getBoundingClientRect()])
  .filter(([e, b]) => b.left >= box.right - 1 && b.top <= y && y <= b.bottom)
  .sort((p, q) => p[1].left - q[1].left).map(([e]) => e.textContent.trim());
"""


def _run_link(driver, run_id: str):
    return _shown(driver, f".ag-row[row-id='{run_id}'] {RUN_NAME_CELL} a[href*='{run_id}']")


def _check_runs_page(d, base: str, exp_id: str, parent, children, metrics=METRICS) -> None:
    """The experiment's runs page: the sweep's parent run with its trials nested under it, and (once chosen
    in Columns: MLflow 3 shows no metric column by default) each trial's value in the metric columns."""
    d.get(f"{base}/#/experiments/{exp_id}/runs")
    parent_id = parent.info.run_id
    expander = _wait(d, "the parent run's row with an expander for its child runs",
                     lambda d: _shown(d, f".ag-row[row-id='{parent_id}'] {RUN_NAME_CELL} button"))[0]
    assert _run_link(d, parent_id)[0].text == parent.info.run_name
    _close_assistant(d)
    # nested: collapsed under the parent until it is expanded, then drawn indented under it
    assert not any(_shown(d, f".ag-row[row-id='{r.info.run_id}']") for r in children), "child runs not nested"
    expander.click()
    parent_x = _run_link(d, parent_id)[0].location["x"]
    for r in children:
        link = _wait(d, f"child run {r.info.run_name} in the runs table", lambda d: _run_link(d, r.info.run_id))[0]
        assert link.text == r.info.run_name
        assert link.location["x"] > parent_x, "child run not indented under its parent"

    d.find_element(By.XPATH, "//button[normalize-space()='Columns']").click()
    for metric in metrics:
        search = _wait(d, "the column search box", lambda d: _shown(d, "input[placeholder='Search columns']"))[0]
        search.send_keys(Keys.CONTROL, "a")
        search.send_keys(metric)
        _wait(d, f"{metric} in the column chooser", lambda d: [e for e in d.find_elements(
            By.XPATH, f"//span[contains(@class,'tree-title')][normalize-space()='{metric}']") if e.is_displayed()]
              )[0].click()
    d.switch_to.active_element.send_keys(Keys.ESCAPE)
    for metric in metrics:
        col = f"[col-id='metrics.`{metric}`']"
        header = _wait(d, f"the {metric} column header", lambda d: _shown(d, f".ag-header-cell{col}"))[0]
        assert header.text == metric
        for r in children:
            cell = _wait(d, f"{metric} of {r.info.run_name}", lambda d: [
                e for e in _shown(d, f".ag-row[row-id='{r.info.run_id}'] {col}") if e.text.strip()])[0]
            assert float(cell.text) == pytest.approx(r.data.metrics[metric], rel=1e-6), (metric, cell.text)


def _fold(d, *sections) -> None:
    for section in sections:
        header = d.find_element(By.XPATH, f"//*[@role='button'][@aria-expanded='true'][normalize-space()='{section}']")
        header.click()
        _wait(d, f"{section} folded", lambda d: header.get_attribute("aria-expanded") == "false")


def _check_compare_view(d, exp_id: str, children, metrics=METRICS) -> None:
    """Tick the trials on the runs page and press Compare, as a person would: the compare view names each
    trial, and each metric's row shows each trial's logged value."""
    by_id = {r.info.run_id: r for r in children}
    for run_id in by_id:
        d.find_element(By.CSS_SELECTOR, f".ag-row[row-id='{run_id}'] input.ag-checkbox-input").click()
    _wait(d, "the Compare button", lambda d: [b for b in d.find_elements(
        By.XPATH, "//button[normalize-space()='Compare']") if b.is_enabled()])[0].click()
    _wait(d, "the compare-runs route", lambda d: "#/compare-runs?" in d.current_url)
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(d.current_url.split("#", 1)[1]).query)
    compared = json.loads(query["runs"][0])  # the page's run columns, left to right
    assert sorted(compared) == sorted(by_id) and json.loads(query["experiments"][0]) == [exp_id]
    _wait(d, "the compare page's heading", lambda d: f"Comparing {len(children)} Runs" in _text(d))
    for r in children:
        _wait(d, f"{r.info.run_name} in the compare view", lambda d: [e for e in d.find_elements(
            By.XPATH, f"//*[normalize-space(text())='{r.info.run_name}']") if e.is_displayed()])
    # Visualizations and Parameters folded: run names and metric rows fit one screenshot
    _fold(d, "Visualizations", "Parameters")
    for metric in metrics:
        label = _wait(d, f"the {metric} row in the compare view", lambda d: d.execute_script(_METRIC_LABEL, metric))
        shown = d.execute_script(_VALUES_ON_LINE, label)
        expected = [by_id[i].data.metrics[metric] for i in compared]
        # shown as MLflow's formatMetric rounds: 3 decimals below 10, 2 below 100, 1 above, 4 digits below 0.001
        assert len(shown) == len(expected) and [float(v) for v in shown] == pytest.approx(
            expected, rel=1e-3, abs=1e-3), (metric, shown, expected)
    d.execute_script("arguments[0].scrollIntoView({block: 'start'})",
                     d.find_element(By.XPATH, "//*[normalize-space(text())='Run details']"))


def _check_parent_artifacts(d, base: str, exp_id: str, parent) -> None:
    """The sweep report logged to the parent run is listed in its artifacts."""
    d.get(f"{base}/#/experiments/{exp_id}/runs/{parent.info.run_id}/artifacts")
    _wait(d, "the parent's report folder", lambda d: [e for e in d.find_elements(
        By.XPATH, "//*[normalize-space(text())='report']") if e.is_displayed()])[0].click()
    for f in ("report.html", "report.md", "pareto.png", "report.json"):
        _wait(d, f"report/{f} among the parent's artifacts", lambda d: f in _text(d))


def _ui_compare_link(store, port: int, log: Path) -> tuple[str, subprocess.Popen]:
    """`peftsweep ui` as a user runs it; returns the compare link it prints for the newest sweep."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    out = open(log, "w")
    proc = subprocess.Popen([str(BIN / "peftsweep"), "ui", "--port", str(port), f"tracking.uri={store['uri']}"],
                            cwd=store["dir"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + WAIT_S
    while time.time() < deadline and proc.poll() is None:
        for line in log.read_text().splitlines():
            if "compare its trials:" in line:
                return line.split("compare its trials:", 1)[1].strip(), proc
        time.sleep(0.5)
    raise AssertionError(f"`peftsweep ui` printed no compare link:\n{log.read_text()[-3000:]}")


def _check_compare_from_ui(d, link: str, children, shots: Path) -> list[Path]:
    """The page `peftsweep ui` links to: every trial with its rank, modules, peak memory and task metric.
    Returns its screenshots: the parameter rows, then the metric rows."""
    d.get(link)
    _wait(d, "the compare page's heading", lambda d: f"Comparing {len(children)} Runs" in _text(d))
    _close_assistant(d)
    for r in children:
        _wait(d, f"{r.info.run_name} in the compare view", lambda d: [e for e in d.find_elements(
            By.XPATH, f"//*[normalize-space(text())='{r.info.run_name}']") if e.is_displayed()])
    for param in ("r", "target_modules", "method"):
        shown = _wait(d, f"the {param} parameter row", lambda d: d.execute_script(_ROW_VALUES, param, "Parameters"))
        logged = sorted(r.data.params[param] for r in children if param in r.data.params)
        assert sorted(shown) == logged, (param, shown, logged)
    _fold(d, "Visualizations")
    d.execute_script(_ROW_VALUES, "r", "Parameters")  # scrolls the rank row to the middle of the screen
    params_png = _save(d, shots / "peftsweep-ui-compare-params.png")
    _fold(d, "Parameters")
    for metric in (record.PEAK_RSS_ABOVE_BASELINE_GB, record.metric_key("test", "accuracy")):
        label = _wait(d, f"the {metric} row", lambda d: d.execute_script(_METRIC_LABEL, metric))
        shown = sorted(float(v) for v in d.execute_script(_VALUES_ON_LINE, label))
        assert shown == pytest.approx(sorted(r.data.metrics[metric] for r in children), rel=1e-3, abs=1e-3), metric
    d.execute_script("arguments[0].scrollIntoView({block: 'start'})",
                     d.find_element(By.XPATH, "//*[normalize-space(text())='Run details']"))
    return [params_png, _save(d, shots / "peftsweep-ui-compare-metrics.png")]


def test_mlflow_ui_shows_the_sweep_runs_and_compares_them(tiny_sweep, tmp_path):
    store = tiny_sweep  # a finished sweep: 6 trials (3 arms x 2 seeds), shared by the session's readers
    shots = tmp_path / "screenshots"
    shots.mkdir()
    server_log = tmp_path / "mlflow-server.log"
    with _mlflow_server(store, server_log) as (base, server):
        # the report, written while the server is up, is among the parent's artifacts when the page asks
        assert main(["report", f"tracking.uri={store['uri']}"]) == 0

        c = MlflowClient(store["uri"])
        exp = c.get_experiment_by_name("peftsweep")
        runs = c.search_runs([exp.experiment_id])
        [parent] = [r for r in runs if r.data.tags.get(record.ROLE) == "sweep"]
        children = [r for r in runs if r.data.tags.get(record.ROLE) == "trial"]
        assert len(children) == 6 and all(r.data.tags[record.PARENT_RUN_ID] == parent.info.run_id
                                          for r in children)
        assert len({r.info.run_name for r in children}) == 6  # told apart by name in the UI
        assert all(m in r.data.metrics for r in children for m in METRICS)

        _wait_healthy(base, server, server_log)
        with _chromium(tmp_path) as d:
            _check_runs_page(d, base, exp.experiment_id, parent, children)
            runs_png = _save(d, shots / "mlflow-runs.png")
            _check_compare_view(d, exp.experiment_id, children)
            compare_png = _save(d, shots / "mlflow-compare.png")
            shutil.copy(compare_png, store["dir"] / "mlflow-compare.png")
            _check_parent_artifacts(d, base, exp.experiment_id, parent)
            # what `peftsweep ui` links to, with its own server: the comparison a user lands on
            link, ui = _ui_compare_link(store, _free_port(), tmp_path / "peftsweep-ui.log")
            try:
                _wait_healthy(link.split("/#/")[0], ui, tmp_path / "peftsweep-ui.log")
                artifacts = Path(__file__).resolve().parent.parent / "test-artifacts"  # kept for people to look at
                artifacts.mkdir(exist_ok=True)
                for png in _check_compare_from_ui(d, link, children, shots):
                    shutil.copy(png, artifacts / png.name)
            finally:
                _stop_group(ui)
    assert server.poll() is not None, "mlflow server still running"
    assert (store["dir"] / "mlflow-compare.png").read_bytes() == compare_png.read_bytes()
    assert runs_png.stat().st_size > 20_000
