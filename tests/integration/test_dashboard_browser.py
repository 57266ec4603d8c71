"""The dashboard in headless Chromium, against the live local stack with a task running.

Chromium runs the page's JavaScript (``--dump-dom`` after ``--virtual-time-budget``); the
rendered DOM is parsed and every drawn point (``data-*`` attributes on the SVG circles and
bars, the per-round table) is compared with the metrics JSON in the bucket and the records
in Firestore. A screenshot goes to ``out/test-artifacts/dashboard.png``.

Needs Debian's ``chromium`` (``make browser`` installs it); without it the test fails and
says so rather than skipping.
"""
from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from fedcompute.dp import DpParams
from fedcompute.fleet.protocol import DeviceHttpClient
from fedcompute.monitoring.metrics import PRIVACY_EPSILON
from fedcompute.tasks.records import TaskStatus
from support.stack_plugin import StackHandle
from support.tasks import check_in, create_numpy_task, make_update, random_delta, run_device

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "out" / "test-artifacts" / "dashboard.png"


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("Chromium is not installed: run `make browser` (apt-get install -y chromium chromium-driver)")
    return found


def run_chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [
        chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
        f"--user-data-dir={profile}", "--virtual-time-budget=10000", *extra, url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


class Elements(HTMLParser):
    """Every start tag of the document with its attributes (and the text of <title> tooltips skipped)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def having(self, tag: str, attr: str) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == tag and attr in a]


def rendered(url: str, profile: Path) -> Elements:
    parser = Elements()
    parser.feed(run_chromium(url, profile, "--dump-dom").stdout)
    body = parser.having("body", "data-state")
    assert body and body[0]["data-state"] == "ready", body
    return parser


def drive_round(task, client: DeviceHttpClient, round_number: int, rng: np.random.Generator) -> None:
    for i in range(task.report_goal):
        payload, _ = make_update(task, random_delta(task, rng), num_examples=3 + i, seed=int(rng.integers(1 << 30)))
        assert run_device(client, task.population, payload).upload_status == 200
    task.wait_round(round_number, timeout_s=120)


def check_metric_points(page: Elements, task, rounds: list[int]) -> None:
    points = page.having("circle", "data-metric")
    stored = {r: task.round_metrics(r) for r in rounds}
    names = list(stored[rounds[0]])
    drawn = {(p["data-metric"], int(p["data-round"])): float(p["data-value"]) for p in points}
    assert set(drawn) == {(name, r) for name in names for r in rounds}
    for (name, r), value in drawn.items():
        assert value == pytest.approx(stored[r][name], rel=1e-12), (name, r)


def test_dashboard_renders_the_live_task(local_stack: StackHandle, tmp_path: Path) -> None:
    task = create_numpy_task(local_stack, f"dash-{uuid.uuid4().hex[:8]}", report_goal=2, over_selection_rate=0.5,
                             rounds=4)
    client = DeviceHttpClient(local_stack.settings.task_assignment_url, timeout=30)
    rng = np.random.default_rng(7)
    for r in (1, 2):
        drive_round(task, client, r, rng)
    check_in(client, task.population)  # round 3 has a device at work: the task is running
    url = f"{local_stack.urls['dashboard']}/?population={task.population}&task={task.task_id}"

    started = time.monotonic()
    page = rendered(url, tmp_path / "profile")
    render_s = time.monotonic() - started
    record = task.record()
    assert record.status == TaskStatus.OPEN and record.current_round == 3
    (row,) = [a for a in page.having("tr", "data-run") if a["data-run"] == f"{task.population}/{task.task_id}"]
    assert (row["data-status"], row["data-current-round"], float(row["data-epsilon"])) == (
        "OPEN", "3", record.epsilon_spent)
    assert "selected" in row["class"]
    # While the task runs the page refreshes every 3 s: several refreshes in 10 s of virtual time.
    assert int(page.having("body", "data-refreshes")[0]["data-refreshes"]) >= 3
    check_metric_points(page, task, [1, 2])

    counts = {int(a["data-round"]): a for a in page.having("tr", "data-round")}
    assert sorted(counts) == [1, 2, 3]
    assert (counts[3]["data-status"], counts[3]["data-assigned"], counts[3]["data-in-progress"]) == ("COLLECTING", "1", "1")
    for r in (1, 2):
        assert (counts[r]["data-status"], counts[r]["data-completed"]) == ("COMPLETED", "2")
    bars = {int(a["data-round"]): a for a in page.having("rect", "data-collecting")}
    for r in (1, 2):
        it = task.round_record(r)
        assert float(bars[r]["data-collecting"]) == pytest.approx(it.aggregating_time - it.created_time)
        assert float(bars[r]["data-aggregating"]) == pytest.approx(it.completed_time - it.aggregating_time)
    assert 3 not in bars  # still collecting: no processing time yet
    per_minute = page.having("rect", "data-count")
    assert sum(int(a["data-count"]) for a in per_minute) == 5  # 2 + 2 devices, and the one at work in round 3
    over_time = page.having("circle", "data-completed")
    assert [int(a["data-completed"]) for a in over_time] == [1, 2]

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    run_chromium(url, tmp_path / "profile-shot", f"--screenshot={SCREENSHOT}", "--window-size=1280,1800",
                 "--hide-scrollbars")
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and SCREENSHOT.stat().st_size > 20_000

    # The page follows the task: after round 3 completes it shows three rounds.
    payload, _ = make_update(task, random_delta(task, rng), seed=99)
    assert run_device(client, task.population, payload).upload_status == 200
    assert run_device(client, task.population, make_update(task, random_delta(task, rng), seed=98)[0]).upload_status == 200
    task.wait_round(3, timeout_s=120)
    later = rendered(url, tmp_path / "profile")
    check_metric_points(later, task, [1, 2, 3])
    (row,) = [a for a in later.having("tr", "data-run") if a["data-run"] == f"{task.population}/{task.task_id}"]
    assert row["data-current-round"] == "4"
    drive_round(task, client, 4, rng)  # finish the task: the page then slows down to a refresh every 15 s
    assert task.record().status == TaskStatus.COMPLETED
    done = rendered(url, tmp_path / "profile")
    assert int(done.having("body", "data-refreshes")[0]["data-refreshes"]) == 1
    check_metric_points(done, task, [1, 2, 3, 4])
    print(f"\ndashboard rendered in headless Chromium in {render_s:.1f} s; screenshot {SCREENSHOT}")


def test_dashboard_shows_the_privacy_ledger_per_round(local_stack: StackHandle, tmp_path: Path) -> None:
    task = create_numpy_task(local_stack, f"dashdp-{uuid.uuid4().hex[:8]}", report_goal=2, over_selection_rate=0.5,
                             rounds=2, dp=DpParams(mechanism="FIXED_GAUSSIAN", noise_multiplier=1.0, clip_norm=1.0))
    client, rng = DeviceHttpClient(local_stack.settings.task_assignment_url, timeout=30), np.random.default_rng(8)
    for r in (1, 2):
        drive_round(task, client, r, rng)
    page = rendered(f"{local_stack.urls['dashboard']}/?population={task.population}&task={task.task_id}",
                    tmp_path / "profile")
    ledger = {int(a["data-round"]): a for a in page.having("tr", "data-spent")}
    assert sorted(ledger) == [1, 2]
    epsilon = {r: task.round_metrics(r)[PRIVACY_EPSILON] for r in (1, 2)}
    assert 0 < epsilon[1] < epsilon[2] == pytest.approx(task.record().epsilon_spent, rel=1e-12)
    for r, spent in ((1, epsilon[1]), (2, epsilon[2] - epsilon[1])):
        assert float(ledger[r]["data-epsilon"]) == pytest.approx(epsilon[r], rel=1e-12)
        assert float(ledger[r]["data-spent"]) == pytest.approx(spent, rel=1e-9)


@pytest.fixture
def keyed_dashboard(local_stack: StackHandle, tmp_path: Path) -> Iterator[str]:
    """A second dashboard function on the same stack that requires an API key, as deployed."""
    import os

    import psutil
    import requests

    from fedcompute.stack import procs
    from fedcompute.stack.local import HOST, functions_framework_executable

    port = procs.free_port(HOST)
    source = REPO / "functions" / "dashboard" / "main.py"
    popen = procs.start_process(
        [str(functions_framework_executable()), "--source", str(source), "--target", "dashboard",
         "--host", HOST, "--port", str(port)],
        log_path=tmp_path / "dashboard.log", env={**os.environ, **local_stack.env(), "FEDCOMPUTE_API_KEY": API_KEY},
        cwd=source.parent)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline and popen.poll() is None, (tmp_path / "dashboard.log").read_text()
            time.sleep(0.2)
        yield url
    finally:
        procs.terminate([psutil.Process(popen.pid), *psutil.Process(popen.pid).children(recursive=True)],
                        grace_s=5.0)
        popen.wait(timeout=10)


API_KEY = "dashboard-test-key"


def test_deployed_dashboard_sends_the_api_key(local_stack: StackHandle, keyed_dashboard: str, tmp_path: Path) -> None:
    import requests

    task = create_numpy_task(local_stack, f"dashkey-{uuid.uuid4().hex[:8]}", report_goal=2, rounds=2)
    assert requests.get(f"{keyed_dashboard}/api/tasks", timeout=10).status_code == 401  # the API is guarded
    query = f"?population={task.population}&task={task.task_id}"

    without = Elements()
    without.feed(run_chromium(f"{keyed_dashboard}/{query}", tmp_path / "p1", "--dump-dom").stdout)
    assert without.having("body", "data-state")[0]["data-state"] == "needs-key"
    (form,) = [a for t, a in without.elements if t == "form" and a.get("id") == "key-form"]
    assert "hidden" not in form  # the page asks for the key

    page = rendered(f"{keyed_dashboard}/{query}#key={API_KEY}", tmp_path / "p2")
    rows = [a for a in page.having("tr", "data-run") if a["data-run"] == f"{task.population}/{task.task_id}"]
    assert len(rows) == 1 and rows[0]["data-status"] == "OPEN"
