"""``make demo PRIVATE=1``: central DP that works, next to the accuracy it costs.

10,000 simulated devices (6 Fashion-MNIST examples each), 1,000 per round, 25 rounds of
FedAvg (4 local epochs) on a small logistic-regression model with FIXED_GAUSSIAN DP (noise multiplier 1.0,
clip norm 1.0), population_size = the simulated fleet, δ = 1/population, target ε ≤ 5,
built WITHOUT ``--skip_dp_check``. Then the same configuration without noise (the
non-private baseline): by default in-process (:mod:`fedcompute.fleet.reference`: the same
plan, device step, clipping and server round, without the protocol), ``baseline="stack"``
through the stack like the private run, ``"none"`` skipped. The in-process reference runs
beside the fleet at low priority, on the CPU the stack leaves idle. Ends with a table and a figure of test
accuracy and ε after every round, and ``summary.json``.

:func:`run_tradeoff` trains the same configuration at several noise multipliers and draws
the privacy/utility trade-off (final ε and accuracy per noise multiplier).

The fleet is a :class:`~fedcompute.fleet.runner.ProcessFleet`: worker processes load the
model once and serve many devices; every device still checks in, trains on its own six
examples and reports by itself.
"""
from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcompute.errors import FedComputeError

GOAL_EPSILON = 5.0
GOAL_ACCURACY = 0.80
GOAL_WALL_TIME_S = 20 * 60

CONFIG_TEMPLATE = """\
# Written by `make demo PRIVATE=1` (fedcompute.private_demo).
population_name: "{population}"
mode: TRAINING_ONLY
policies {{
  min_separation_policy {{
    minimum_separation: 0
  }}
  model_release_policy {{
    num_max_training_rounds: {rounds}
    dp_target_epsilon: {target_epsilon}
    dp_delta: {delta}
    # fedcompute extension: the simulated fleet is the whole population (DP accounting).
    population_size: {population_size}
  }}
  dataset_policy {{
    batch_size: {batch_size}
    num_epochs: {epochs}
  }}
}}
federated_learning {{
  learning_process {{
    type: FED_AVG
    client_optimizer: SGD
    client_learning_rate: {client_lr}
    server_optimizer: {server_optimizer}
    server_learning_rate: {server_lr}
    runtime_config {{
      report_goal: {report_goal}
      over_selection_rate: {over_selection_rate}
    }}
    metrics {{
      name: "sparse_categorical_accuracy"
    }}
  }}
}}
differential_privacy {{
  type: FIXED_GAUSSIAN
  noise_multiplier: {noise}
  clip_norm: {clip_norm}
}}
"""


@dataclass(frozen=True)
class PrivateDemoOptions:
    """The knobs of ``make demo PRIVATE=1`` (README, "Private demo")."""

    devices: int = 10_000
    examples_per_device: int = 6
    report_goal: int = 1000
    rounds: int = 25
    noise: float = 1.0
    clip_norm: float = 1.0
    target_epsilon: float = GOAL_EPSILON
    client_lr: float = 0.3
    epochs: int = 4
    batch_size: int = 6
    server_optimizer: str = "ADAM"
    server_lr: float = 0.05
    # The simulated phones do not drop out, so ODP's default over-selection (0.3) would only
    # make ~30% of each round's devices train and upload for nothing (LATE_UPLOAD): 5% covers
    # the few that report after the round closed.
    over_selection_rate: float = 0.05
    # The same configuration without noise beside the private run: "reference" (in-process,
    # fedcompute.fleet.reference), "stack" (a second fleet run through the stack) or "none".
    baseline: str = "reference"
    processes: int = 2
    threads: int = 6
    # Real seconds per simulated second (retry windows, training interval, first check-ins).
    # At 1.0 the devices wait ODP's real retry windows (60-300 s) after a rejection, so
    # 10,000 of them check in at ~50/s: about what the stack serves on 2 cores. A shorter
    # scale only adds rejected check-ins while a round aggregates, at the rounds' expense.
    time_scale: float = 1.0
    first_check_in_within_s: float = 120.0  # the devices' first check-ins, spread over this
    seed: int = 0
    out_dir: Path = Path("out/demo_private")
    state_dir: Path = Path(".fedcompute")
    task_builder_port: int = 5000
    keep_stack: bool = True
    timeout_s: float = 3600.0

    @property
    def population_size(self) -> int:
        return self.devices

    @property
    def delta(self) -> float:
        return 1.0 / self.devices

    def population_spec(self) -> Any:
        """The fleet's data, as every worker process and the in-process reference rebuild it."""
        from fedcompute.fleet.population import PopulationSpec

        return PopulationSpec(num_devices=self.devices, examples_per_device=self.examples_per_device, seed=self.seed)


@dataclass
class RunResult:
    """One training run: test accuracy and ε after every round."""

    label: str
    population: str
    task_id: int
    noise_multiplier: float
    rounds: list[dict[str, float | None]] = field(default_factory=list)
    final_test_accuracy: float = math.nan
    final_epsilon: float | None = None
    build_report: str = ""
    wall_time_s: float = 0.0
    fleet: dict[str, Any] = field(default_factory=dict)


def _say(message: str) -> None:
    """Print a line; above the fleet's progress bar when one is showing."""
    from tqdm import tqdm

    tqdm.write(message)


class _Stack:
    """The local stack and its clients, started once for every run of the demo (or one already running)."""

    def __init__(self, options: PrivateDemoOptions, running: Any = None) -> None:
        from fedcompute.adapters.blobs import GcsBlobStore
        from fedcompute.adapters.clients import make_clients
        from fedcompute.adapters.task_management_client import TaskManagementClient
        from fedcompute.settings import Settings
        from fedcompute.stack import LocalStack

        self.owned = running is None
        self.local = running or LocalStack(options.state_dir, task_builder_port=options.task_builder_port)
        if self.owned:
            status = self.local.start()
            _say(f"   healthy in {status.time_to_healthy_s or 0:.1f} s; task builder at "
                 f"{self.local.urls['task_builder']}")
        os.environ.update(self.local.env())
        self.settings = Settings.from_env()
        self.clients = make_clients(self.settings)  # once per demo
        self.blobs = GcsBlobStore(self.clients.storage)
        self.management = TaskManagementClient(self.settings.task_management_url, api_key=self.settings.api_key)

    def reference_task(self, population: str, task_id: int) -> Any:
        """A built task's record and artifacts, for fedcompute.fleet.reference."""
        from fedcompute.adapters.firestore_store import FirestoreTaskStore
        from fedcompute.fleet.reference import load_reference_task

        return load_reference_task(FirestoreTaskStore(self.clients.firestore), self.blobs,
                                   self.settings.model_bucket, population, task_id)


# What a saved model directory was made from: a directory of another revision or seed is
# saved again (a model saved by an older demo, with a loss devices cannot run in TFLite,
# would fail the flex-ops check).
MODEL_REVISION = "logistic_regression/builtin_cross_entropy/1"


def model_stamp(model_dir: Path) -> Path:
    """Where the revision and seed of ``model_dir`` are recorded: beside it, not inside, so the
    stamp is not zipped into the SavedModel the task builder receives."""
    return model_dir.with_name(model_dir.name + ".stamp.json")


def _stamp_text(seed: int) -> str:
    """What :func:`model_stamp` holds for a model of this revision saved with ``seed``."""
    return json.dumps({"revision": MODEL_REVISION, "seed": seed})


def model_is_saved(model_dir: Path, seed: int) -> bool:
    """True if ``model_dir`` holds the small model of this revision and ``seed``."""
    stamp_file = model_stamp(model_dir)
    current = stamp_file.read_text() if stamp_file.is_file() else ""
    return (model_dir / "saved_model.pb").exists() and current == _stamp_text(seed)


def save_model(model_dir: Path, seed: int) -> Path:
    """The small model (logistic regression) as a SavedFunctionalModel, once per revision and seed."""
    if not model_is_saved(model_dir, seed):
        from fedcompute.models.functional import kill_tff_worker_children
        from fedcompute.models.small_classifier import save_small_classifier

        if model_dir.exists():
            shutil.rmtree(model_dir)
        try:
            save_small_classifier(str(model_dir), hidden_units=0, seed=seed)
        finally:
            kill_tff_worker_children()
        model_stamp(model_dir).write_text(_stamp_text(seed))
    return model_dir


def write_config(path: Path, options: PrivateDemoOptions, population: str, noise: float) -> Path:
    path.write_text(CONFIG_TEMPLATE.format(
        population=population, rounds=options.rounds, target_epsilon=options.target_epsilon, delta=options.delta,
        population_size=options.population_size, batch_size=options.batch_size, epochs=options.epochs,
        client_lr=options.client_lr, server_optimizer=options.server_optimizer, server_lr=options.server_lr,
        report_goal=options.report_goal, over_selection_rate=options.over_selection_rate, noise=noise,
        clip_norm=options.clip_norm))
    return path


def build_task(stack: _Stack, model_dir: Path, config: Path, population: str, *,
               skip_dp_check: bool) -> tuple[int, str]:
    """``task_builder_client`` (the demo's private task: without --skip_dp_check). Returns (task id, report)."""
    command = [str(Path(sys.executable).parent / "task_builder_client"),
               f"--task_builder_server={stack.local.urls['task_builder']}", f"--saved_model={model_dir}",
               f"--task_config={config}"]  # flex-ops check on: the devices run the plan's TFLite step
    if skip_dp_check:
        command.append("--skip_dp_check=True")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise FedComputeError(f"the task build failed: {result.stderr.strip()}")
    task = next(t for t in stack.management.list_tasks(population) if t.info.WhichOneof("info") == "training_info")
    return task.task_id, result.stdout


def make_fleet(stack: _Stack, options: PrivateDemoOptions, population: str, label: str) -> Any:
    """The worker-process fleet for ``population``, started (its workers load TensorFlow meanwhile)."""
    from fedcompute.fleet.runner import ProcessFleet, TrainingInterval
    from fedcompute.fleet.workers import HttpRunnerFactory

    spec = options.population_spec()
    fleet = ProcessFleet(options.devices, HttpRunnerFactory(stack.settings.task_assignment_url, population, spec),
                         processes=options.processes, threads=options.threads,
                         interval=TrainingInterval(minimum_interval_s=60.0), time_scale=options.time_scale,
                         first_check_in_within_s=options.first_check_in_within_s,
                         seed=options.seed, progress=f"{label}: device sessions")
    fleet.start()
    return fleet


def train(stack: _Stack, options: PrivateDemoOptions, fleet: Any, population: str, task_id: int,
          label: str) -> dict[str, Any]:
    """Run the fleet until the task completes; per-round lines as rounds finish."""
    state = {"round": 1, "errors": 0}

    def on_session(outcome: Any, _stats: Any) -> None:
        if outcome.status == "ERROR" and state["errors"] < 3:  # say what goes wrong, once or twice
            state["errors"] += 1
            _say(f"   device session error (retried later): {outcome.detail[:200]}")

    def until(_stats: Any) -> bool:
        current = stack.management.get_task(population, task_id)
        completed = current.current_round - 1 if current.status == 1 else current.current_round
        while state["round"] <= completed:
            metrics = _read_metrics(stack, population, task_id, state["round"])
            eps = metrics.get("server/privacy/epsilon")
            acc = metrics.get("server/client_work/train/sparse_categorical_accuracy", math.nan)
            _say(f"   {label} round {state['round']:>3}/{options.rounds}: train accuracy {acc:.3f}, "
                 f"epsilon {_fmt_eps(eps)}")
            state["round"] += 1
        return current.status != 1  # no longer OPEN

    started = time.monotonic()
    stats = fleet.run(until, timeout_s=options.timeout_s, poll_s=1.0, on_session=on_session)
    elapsed = time.monotonic() - started
    cost = fleet.cost
    return {
        "sessions": dict(stats.outcomes), "wall_time_s": round(elapsed, 1),
        "devices_per_s": round(stats.sessions / elapsed, 1) if elapsed else None,
        "uploads_per_s": round(stats.outcomes["UPLOADED"] / elapsed, 1) if elapsed else None,
        "per_session_ms": {k: round(v, 2) for k, v in cost.per_session_ms().items()},
        "cpu_share_outside_training": round(cost.cpu_share_outside_training, 3),
        "training_cpu_s": round(cost.compute_cpu_s, 2), "session_cpu_s": round(cost.cpu_s, 2),
        "worker_processes": len(cost.worker_pids), "origin_downloads": cost.origin_downloads,
        "errors": stats.errors[:5],
    }


def _fmt_eps(eps: float | None) -> str:
    return "inf" if eps is None or not math.isfinite(eps) or eps < 0 else f"{eps:.4f}"


def _read_metrics(stack: _Stack, population: str, task_id: int, round_number: int) -> dict[str, float]:
    from fedcompute import layout

    return json.loads(stack.blobs.read(stack.settings.model_bucket,
                                       layout.metrics_path(population, task_id, round_number)))


class _TestSet:
    """The 10,000 Fashion-MNIST test images and the model, loaded once per demo."""

    def __init__(self, model_dir: Path) -> None:
        from fedcompute.data.fashion_mnist import load_fashion_mnist
        from fedcompute.learning import client_training

        self.model = client_training.load_model(model_dir)
        x, y = load_fashion_mnist("test")
        self.batches = client_training.batches_from_arrays(x, y.reshape(-1, 1), 2000)

    def evaluate(self, weights: list[np.ndarray]) -> tuple[float, float]:
        """(test accuracy, test loss) of the client model with ``weights``."""
        from fedcompute.learning import client_training, metric_stats

        stats = client_training.evaluate_on_device(self.model, weights, self.batches, ["sparse_categorical_accuracy"])
        return (round(metric_stats.finalize("sparse_categorical_accuracy", stats["sparse_categorical_accuracy"]), 5),
                round(metric_stats.finalize("loss", stats["loss"]), 5))


def evaluate_rounds(stack: _Stack, model_dir: Path, population: str, task_id: int,
                    rounds: int) -> list[dict[str, float | None]]:
    """Test accuracy (the 10,000 Fashion-MNIST test images) and ε after every round."""
    from fedcompute import layout
    from fedcompute.learning.tensor_codec import decode_bundle

    test = _TestSet(model_dir)
    rows: list[dict[str, float | None]] = []
    for r in range(1, rounds + 1):
        named, _ = decode_bundle(stack.blobs.read(stack.settings.model_bucket,
                                                  layout.client_checkpoint_path(population, task_id, r)))
        accuracy, loss = test.evaluate([np.asarray(a) for _, a in named])
        metrics = _read_metrics(stack, population, task_id, r)
        eps = metrics.get("server/privacy/epsilon")
        rows.append({
            "round": r, "test_accuracy": accuracy, "test_loss": loss,
            "epsilon": None if eps is None or not math.isfinite(eps) or eps < 0 else eps,
            "delta": metrics.get("server/privacy/delta"),
            "train_accuracy": metrics.get("server/client_work/train/sparse_categorical_accuracy"),
        })
    return rows


# The background reference's priority: below the stack and the fleet (nice 0), so it runs on
# the CPU they leave idle (the fleet phase leaves ~10 % of both cores) instead of after them.
REFERENCE_NICENESS = 19


@dataclass
class BackgroundReference:
    """The non-private reference, running in a low-priority process while the fleet trains."""

    process: Any
    rows_path: Path
    started: float


def start_reference(stack: _Stack, options: PrivateDemoOptions, model_dir: Path, population: str,
                    task_id: int) -> BackgroundReference:
    """Start the private task's configuration without noise in-process (fedcompute.fleet.reference:
    the same plan, device step, clipping and server round; ``report_goal`` uniformly chosen
    devices) in a child process at :data:`REFERENCE_NICENESS`; :func:`finish_reference` collects it."""
    task = stack.reference_task(population, task_id)
    rows_path = options.out_dir / "non_private_reference_rounds.json"
    rows_path.unlink(missing_ok=True)
    process = multiprocessing.get_context("spawn").Process(  # TensorFlow is not fork-safe
        target=_reference_job, args=(task, options, str(model_dir), population, str(rows_path)),
        name="non-private-reference")
    process.start()
    return BackgroundReference(process, rows_path, time.monotonic())


def _reference_job(task: Any, options: PrivateDemoOptions, model_dir: str, population: str, rows_path: str) -> None:
    """The reference's rounds and their test accuracy, written to ``rows_path`` (a child process)."""
    from fedcompute.fleet.reference import run_reference
    from fedcompute.learning.dp_core import METRIC_NOISE_STDDEV

    os.nice(REFERENCE_NICENESS)  # inherited by its worker processes
    test = _TestSet(Path(model_dir))
    rows: list[dict[str, float | None]] = []

    def on_round(round_number: int, named: list[tuple[str, np.ndarray]], metrics: dict[str, float]) -> None:
        accuracy, loss = test.evaluate([a for _, a in named])
        rows.append({"round": round_number, "test_accuracy": accuracy, "test_loss": loss, "epsilon": None,
                     "delta": None, "noise_stddev": metrics.get(METRIC_NOISE_STDDEV),
                     "train_accuracy": metrics.get("server/client_work/train/sparse_categorical_accuracy")})

    run_reference(task, options.population_spec(), population=population, report_goal=options.report_goal,
                  rounds=options.rounds, noise_multiplier=0.0, seed=options.seed, processes=options.processes,
                  on_round=on_round)
    Path(rows_path).write_text(json.dumps(rows))


def finish_reference(reference: BackgroundReference, private: RunResult) -> RunResult:
    """Wait for the background reference (usually done by the end of the fleet) and return its rounds."""
    waited = time.monotonic()
    reference.process.join()
    if reference.process.exitcode != 0 or not reference.rows_path.is_file():
        raise FedComputeError(f"the non-private reference failed (exit code {reference.process.exitcode})",
                              hint="its traceback is printed above; BASELINE=none skips it")
    rows = json.loads(reference.rows_path.read_text())[:len(private.rounds)]
    _say(f"   done in {time.monotonic() - reference.started:.0f} s, beside the fleet "
         f"(waited {time.monotonic() - waited:.0f} s for it after the private run)")
    return RunResult(label="non-private (in-process reference)", population=private.population,
                     task_id=private.task_id, noise_multiplier=0.0, rounds=rows,
                     final_test_accuracy=float(rows[-1]["test_accuracy"] or math.nan) if rows else math.nan,
                     wall_time_s=round(time.monotonic() - reference.started, 1))


def one_run(stack: _Stack, options: PrivateDemoOptions, model_dir: Path, noise: float, label: str, *,
            skip_dp_check: bool = False, after_build: Callable[[str, int], None] | None = None) -> RunResult:
    """Build and train one task at ``noise``; noise 0 (epsilon infinite) needs --skip_dp_check.
    ``after_build(population, task id)`` runs once the task is built, before the fleet trains."""
    started = time.monotonic()
    private = noise > 0
    skip_dp_check = skip_dp_check or not private
    population = f"fashion_private_{'z' + str(noise).replace('.', '_') if private else 'nonprivate'}_" \
                 f"{time.strftime('%Y%m%d_%H%M%S')}"
    config = write_config(options.out_dir / f"task_config_{label}.pbtxt", options, population, noise)
    _say(f"   task_builder_client --task_config={config}" + (" --skip_dp_check" if skip_dp_check else ""))
    fleet = make_fleet(stack, options, population, label)  # workers start while the task builds
    try:
        task_id, report = build_task(stack, model_dir, config, population, skip_dp_check=skip_dp_check)
    except BaseException:
        fleet.stop()
        raise
    for line in report.splitlines():
        if "dp_epsilon" in line or "privacy_assumptions" in line or "noise_multiplier" in line:
            _say(f"   report: {line.split('] ', 1)[-1].strip()}")
    runtime = device_runtime(stack, population, task_id)
    _say(f"   devices run the plan with {runtime['name']}: {runtime['reason']}")
    if after_build is not None:
        after_build(population, task_id)
    fleet_figures = train(stack, options, fleet, population, task_id, label)
    fleet_figures["device_runtime"] = runtime
    task = stack.management.get_task(population, task_id)
    done = task.current_round if task.status != 1 else task.current_round - 1
    rows = evaluate_rounds(stack, model_dir, population, task_id, done)
    return RunResult(label=label, population=population, task_id=task_id, noise_multiplier=noise, rounds=rows,
                     final_test_accuracy=float(rows[-1]["test_accuracy"] or math.nan) if rows else math.nan,
                     final_epsilon=rows[-1]["epsilon"] if rows else None, build_report=report,
                     wall_time_s=round(time.monotonic() - started, 1), fleet=fleet_figures)


def device_runtime(stack: _Stack, population: str, task_id: int) -> dict[str, str]:
    """The runtime the simulated devices pick for the built plan (``auto``, as an ODP client would)."""
    import tempfile

    from fedcompute.fleet.runtimes import choose_runtime
    from fedcompute.plans import unpack_client_plan

    task = stack.reference_task(population, task_id)
    with tempfile.TemporaryDirectory(prefix="fedcompute-plan-") as directory:
        choice = choose_runtime("auto", unpack_client_plan(task.plan, Path(directory)))
    return {"name": choice.name, "reason": choice.reason}


def format_table(private: RunResult, baseline: RunResult | None) -> str:
    """Round | private test accuracy | ε | non-private test accuracy (Markdown)."""
    header = "| round | test accuracy (DP) | epsilon | test accuracy (no DP) |\n|---:|---:|---:|---:|"
    lines = [header]
    base = {int(r["round"] or 0): r for r in (baseline.rounds if baseline else [])}
    for row in private.rounds:
        r = int(row["round"] or 0)
        other = base.get(r, {}).get("test_accuracy")
        lines.append(f"| {r} | {row['test_accuracy']:.4f} | {_fmt_eps(row['epsilon'])} | "
                     f"{'' if other is None else f'{other:.4f}'} |")
    return "\n".join(lines)


def plot_runs(private: RunResult, baseline: RunResult | None, path: Path, options: PrivateDemoOptions) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_eps) = plt.subplots(1, 2, figsize=(11, 4))
    for run, style in ((private, "o-"), (baseline, "s--")):
        if run is None:
            continue
        ax_acc.plot([r["round"] for r in run.rounds], [r["test_accuracy"] for r in run.rounds], style,
                    label=f"{run.label} (noise {run.noise_multiplier:g})", markersize=3)
    ax_acc.axhline(GOAL_ACCURACY, color="grey", lw=0.8, ls=":")
    ax_acc.set(xlabel="round", ylabel="Fashion-MNIST test accuracy", title="test accuracy after each round")
    ax_acc.legend()
    ax_acc.grid(alpha=0.3)
    ax_eps.plot([r["round"] for r in private.rounds], [r["epsilon"] for r in private.rounds], "o-", markersize=3)
    ax_eps.axhline(options.target_epsilon, color="grey", lw=0.8, ls=":")
    ax_eps.set(xlabel="round", ylabel=f"epsilon (delta = {options.delta:.0e})",
               title="privacy spent (non-private run: infinite)")
    ax_eps.grid(alpha=0.3)
    fig.suptitle(f"{options.devices:,} devices x {options.examples_per_device} examples, {options.report_goal:,} "
                 f"per round, FIXED_GAUSSIAN clip {options.clip_norm:g}, population_size {options.population_size:,}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_private_demo(options: PrivateDemoOptions, *, stack: Any = None) -> dict[str, Any]:
    """Run the private demo end to end; returns (and writes) the summary.

    ``stack``: a running :class:`~fedcompute.stack.LocalStack` to use instead of starting one.
    """
    started = time.monotonic()
    out = options.out_dir
    out.mkdir(parents=True, exist_ok=True)
    references: list[BackgroundReference] = []
    _say(f"== 1/5  local stack; population_size = the simulated fleet = {options.population_size:,} devices "
         f"({options.examples_per_device} Fashion-MNIST examples each), delta = 1/{options.population_size:,}")
    running = stack
    model_dir = out / "fashion_logreg"
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as saving:
        # A model not saved yet is saved (TensorFlow's import and a Keras save, once per revision
        # and seed) while the stack's emulators start: neither needs the other. In a process of
        # its own: two threads importing at once can deadlock on the import locks.
        saved = None if model_is_saved(model_dir, options.seed) else saving.submit(save_model, model_dir,
                                                                                    options.seed)
        stack = _Stack(options, running)
        setup_s = time.monotonic() - started
        _say("== 2/5  SavedFunctionalModel: logistic regression on Fashion-MNIST (7,850 parameters)")
        if saved is not None:
            saved.result()
    try:
        _say(f"== 3/5  private run: FIXED_GAUSSIAN noise {options.noise:g}, clip {options.clip_norm:g}, "
             f"{options.report_goal:,} of {options.devices:,} devices per round, {options.rounds} rounds, "
             f"target epsilon {options.target_epsilon:g} (built without --skip_dp_check)")

        def start_background_reference(population: str, task_id: int) -> None:
            _say("   non-private reference started beside the fleet, at low priority: the same task without "
                 "noise (same plan, device step, clipping and server round), run in-process with uniformly "
                 "chosen devices (BASELINE=stack runs it through the stack)")
            references.append(start_reference(stack, options, model_dir, population, task_id))

        private = one_run(stack, options, model_dir, options.noise, "private",
                          after_build=start_background_reference if options.baseline == "reference" else None)
        private_done_s = time.monotonic() - started  # setup + model + the private run: the 20-minute goal
        baseline = None
        if options.baseline == "stack":
            _say("== 4/5  non-private run of the same configuration through the stack (noise 0, same clipping)")
            baseline = one_run(stack, options, model_dir, 0.0, "non-private")
        elif references:
            _say("== 4/5  non-private reference (in-process, started beside the fleet)")
            baseline = finish_reference(references[0], private)
        else:
            _say("== 4/5  non-private run skipped (BASELINE=0)")
        _say("== 5/5  test accuracy and epsilon after every round")
        table = format_table(private, baseline)
        _say(table)
        figure = plot_runs(private, baseline, out / "private_vs_nonprivate.png", options)
        total = time.monotonic() - started
        eps = private.final_epsilon
        summary = {
            "population_size": options.population_size, "devices": options.devices,
            "examples_per_device": options.examples_per_device, "report_goal": options.report_goal,
            "rounds": options.rounds, "noise_multiplier": options.noise, "clip_norm": options.clip_norm,
            "delta": options.delta, "target_epsilon": options.target_epsilon,
            "final_epsilon": eps, "final_test_accuracy": private.final_test_accuracy,
            "goals": {"epsilon_at_most_5": eps is not None and eps <= GOAL_EPSILON,
                      "test_accuracy_at_least_0_80": private.final_test_accuracy >= GOAL_ACCURACY,
                      "wall_time_s": round(private_done_s, 1),
                      "within_20_minutes": private_done_s <= GOAL_WALL_TIME_S},
            "total_wall_time_s": round(total, 1),
            "stack_setup_s": round(setup_s, 1), "private": asdict(private),
            "non_private": asdict(baseline) if baseline else None, "table": table, "figure": str(figure),
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        (out / "table.md").write_text(table + "\n")
        _say(f"\nepsilon after {len(private.rounds)} rounds: {_fmt_eps(eps)} at delta {options.delta:.0e} "
             f"(target {options.target_epsilon:g}); final test accuracy {private.final_test_accuracy:.4f}"
             + (f" (non-private {baseline.final_test_accuracy:.4f})" if baseline else ""))
        _say(f"fleet: {private.fleet.get('devices_per_s')} device sessions/s, per session (ms) "
             f"{private.fleet.get('per_session_ms')}")
        _say(f"figure: {figure}\ntable: {out / 'table.md'}\nsummary: {out / 'summary.json'}")
        if "dashboard" in stack.local.urls:
            _say(f"privacy ledger: {stack.local.urls['dashboard']}/?population={private.population}"
                 f"&task={private.task_id}")
        _say(f"total wall time {total:.0f} s")
        return summary
    finally:
        for reference in references:
            if reference.process.is_alive():  # interrupted: the reference does not outlive the demo
                reference.process.terminate()
        if stack.owned and not options.keep_stack:
            stack.local.stop()


def run_tradeoff(options: PrivateDemoOptions, noises: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5), *,
                 stack: Any = None) -> dict[str, Any]:
    """Final ε and test accuracy per noise multiplier (the privacy/utility figure).

    The private task is built once through the stack (without --skip_dp_check, as in the
    demo); each noise level then trains that task in-process (:mod:`fedcompute.fleet.reference`:
    the same plan, device step, clipping and server round, noise drawn by the server's own DP
    mechanism), and its ε comes from the same accountant as the ledger's.
    """
    from fedcompute.fleet.reference import run_reference
    from fedcompute.learning.server_round import epsilon_after
    from fedcompute.plans import ServerPhase

    out = options.out_dir
    out.mkdir(parents=True, exist_ok=True)
    running = stack
    stack = _Stack(options, running)
    model_dir = save_model(out / "fashion_logreg", options.seed)
    points: list[dict[str, Any]] = []
    try:
        population = f"fashion_tradeoff_{time.strftime('%Y%m%d_%H%M%S')}"
        config = write_config(options.out_dir / "task_config_tradeoff.pbtxt", options, population, options.noise)
        _say(f"== task_builder_client --task_config={config}")
        task_id, _report = build_task(stack, model_dir, config, population, skip_dp_check=False)
        task = stack.reference_task(population, task_id)
        phase = ServerPhase.from_json(task.server_phase)
        spec = options.population_spec()
        test = _TestSet(model_dir)
        for noise in noises:
            started = time.monotonic()
            _say(f"== noise multiplier {noise:g}: {options.rounds} rounds in-process")
            history = run_reference(task, spec, population=population, report_goal=options.report_goal,
                                    rounds=options.rounds, noise_multiplier=noise, seed=options.seed,
                                    processes=options.processes)
            accuracy, _loss = test.evaluate([a for _, a in history[-1]])
            noised = dataclasses.replace(phase, dp=dataclasses.replace(phase.dp, noise_multiplier=noise))
            eps = epsilon_after(noised, options.rounds) if noise > 0 else math.inf
            points.append({"noise_multiplier": noise, "final_epsilon": eps if math.isfinite(eps) else None,
                           "final_test_accuracy": accuracy, "population": population, "task_id": task_id,
                           "wall_time_s": round(time.monotonic() - started, 1)})
            _say(f"   noise {noise:g}: epsilon {_fmt_eps(eps)}, test accuracy {accuracy:.4f}")
    finally:
        if stack.owned and not options.keep_stack:
            stack.local.stop()
    figure = plot_tradeoff(points, out / "privacy_utility.png", options)
    result = {"points": points, "figure": str(figure), "delta": options.delta,
              "population_size": options.population_size, "rounds": options.rounds,
              "report_goal": options.report_goal, "method": "in-process reference run of the built task"}
    (out / "tradeoff.json").write_text(json.dumps(result, indent=2))
    _say(f"figure: {figure}")
    return result


def plot_tradeoff(points: list[dict[str, Any]], path: Path, options: PrivateDemoOptions) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    finite = [p for p in points if p["final_epsilon"] is not None]
    ax.plot([p["final_epsilon"] for p in finite], [p["final_test_accuracy"] for p in finite], "o-")
    for p in finite:
        ax.annotate(f"z={p['noise_multiplier']:g}", (p["final_epsilon"], p["final_test_accuracy"]),
                    textcoords="offset points", xytext=(5, -12))
    for p in points:
        if p["final_epsilon"] is None:
            ax.axhline(p["final_test_accuracy"], color="grey", ls="--", lw=0.8,
                       label=f"no noise (epsilon = inf): {p['final_test_accuracy']:.3f}")
    ax.set_xscale("log")
    ax.set(xlabel=f"final epsilon after {options.rounds} rounds (delta = {options.delta:.0e}, log scale)",
           ylabel="Fashion-MNIST test accuracy", title="privacy / utility trade-off")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
