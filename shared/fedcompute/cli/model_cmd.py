"""``fedcompute model export``: a task's trained weights as a Keras SavedModel, ``.keras`` or TFLite file."""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedcompute import layout

PROBE_EXAMPLES = 32


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("model", help="export a task's trained model")
    sub = parser.add_subparsers(dest="model_command", metavar="COMMAND")
    export = sub.add_parser(
        "export", help="write a checkpoint's weights into the task's model (SavedModel, .keras, TFLite)",
        description="Reads the task's SavedFunctionalModel (from its client plan) and a round's checkpoint from the "
                    "model bucket, writes the trained model in the chosen format to --out, reloads the file and "
                    "checks it predicts what the checkpoint predicts.")
    export.add_argument("--population", required=True, help="population_name of the task")
    export.add_argument("--task", type=int, default=None, help="task id (default: the population's latest task)")
    export.add_argument("--round", type=int, default=None,
                        help="the checkpoint after this round (default: the last completed round)")
    export.add_argument("--format", choices=("saved_model", "keras", "tflite"), default="saved_model",
                        help="saved_model: TensorFlow SavedModel directory; keras: model.keras; "
                             "tflite: model.tflite for inference (default saved_model)")
    export.add_argument("--out", type=Path, default=Path("out/model"), help="output directory (default out/model)")
    export.set_defaults(func=run_export)
    parser.set_defaults(func=lambda args: (parser.print_help(sys.stderr), 2)[1])


@dataclass(frozen=True)
class TrainedModel:
    """A task's model directory (unpacked from its client plan) and one round's weights."""

    population: str
    task_id: int
    round_number: int
    functional_dir: Path
    weights: list[np.ndarray]


def last_checkpoint_round(blobs: Any, bucket: str, population: str, task_id: int, current_round: int) -> int:
    """The highest round ``<= current_round`` whose client checkpoint exists (0: the initial model)."""
    for round_number in range(max(current_round, 0), -1, -1):
        if blobs.exists(bucket, layout.client_checkpoint_path(population, task_id, round_number)):
            return round_number
    return 0


def load_trained_model(store: Any, blobs: Any, bucket: str, population: str, task_id: int | None,
                       round_number: int | None, work_dir: Path) -> TrainedModel:
    """Fetch the task's model and a checkpoint's weights (from the model bucket) into ``work_dir``.

    Raises:
        NotFoundError: no such task, or no checkpoint for ``round_number``.
        InvalidRequestError: the task is an evaluation task.
    """
    from fedcompute.cli.metrics_cmd import latest_task_id
    from fedcompute.errors import InvalidRequestError, NotFoundError
    from fedcompute.learning.tensor_codec import decode_bundle
    from fedcompute.plans import unpack_plan

    task_id = task_id if task_id is not None else latest_task_id(store, population)
    task = store.get_task(population, task_id)
    if task is None:
        raise NotFoundError(f"task {population}/{task_id} does not exist",
                            hint="`fedcompute task list --population ...` lists the tasks")
    if task.source_population:
        raise InvalidRequestError(f"task {population}/{task_id} is an evaluation task: it has no checkpoints",
                                  hint=f"export its training task {task.source_population}/{task.source_task_id}")
    last = last_checkpoint_round(blobs, bucket, population, task_id, task.current_round)
    chosen = last if round_number is None else round_number
    if not 0 <= chosen <= last or not blobs.exists(bucket, layout.client_checkpoint_path(population, task_id, chosen)):
        raise NotFoundError(f"task {population}/{task_id} has no checkpoint for round {chosen}",
                            hint=f"pass --round between 0 (the initial model) and {last}")
    unpack_plan(blobs.read(bucket, layout.client_plan_path(population, task_id)), work_dir)
    named, _ = decode_bundle(blobs.read(bucket, layout.client_checkpoint_path(population, task_id, chosen)))
    return TrainedModel(population, task_id, chosen, work_dir / "saved_model", [np.asarray(a) for _, a in named])


def probe_inputs(shape: list[int | None], dtype: str, count: int = PROBE_EXAMPLES, seed: int = 0) -> np.ndarray:
    """Deterministic inputs in [0, 1) of the model's input shape (the batch dimension becomes ``count``)."""
    rng = np.random.default_rng(seed)
    return rng.random([count, *[d or 1 for d in shape[1:]]]).astype(dtype)


def export_trained_model(trained: TrainedModel, fmt: str, out: Path, probe: np.ndarray | None = None) -> Any:
    """Export ``trained`` to ``out`` in ``fmt`` and check the file against the checkpoint's own predictions.

    The reference is the task's functional model run with the checkpoint's weights (what a
    device evaluates); the Keras model must match it, and the written file must match the Keras model.
    """
    from fedcompute.errors import InvalidRequestError
    from fedcompute.learning import client_training
    from fedcompute.models import export

    model = export.build_keras_model(trained.functional_dir, trained.weights)
    probe = probe if probe is not None else probe_inputs(model.example_input_shape, model.input_dtype)
    reference = client_training.load_model(trained.functional_dir, cache=False).predict(trained.weights, probe)
    difference = float(np.max(np.abs(np.asarray(model.predict_on_batch(probe)) - reference)))
    if not difference <= export.KERAS_TOLERANCE:
        raise InvalidRequestError(f"the Keras model differs from the checkpoint's predictions by {difference:.3g}",
                                  hint="report this as a bug with the task's model")
    return export.export_model(model, fmt, out, probe)


def run_export(args: argparse.Namespace) -> int:
    from fedcompute.cli.metrics_cmd import connect

    settings, store, blobs = connect()
    with tempfile.TemporaryDirectory(prefix="fedcompute-export-") as work:
        trained = load_trained_model(store, blobs, settings.model_bucket, args.population, args.task, args.round,
                                     Path(work))
        result = export_trained_model(trained, args.format, args.out)
    print(f"{result.path}  ({args.format}: {trained.population}/{trained.task_id} after round {trained.round_number}; "
          f"reloaded, max |prediction difference| {result.max_abs_difference:.2g})")
    print(load_hint(result.path, args.format))
    return 0


def load_hint(path: Path, fmt: str) -> str:
    """How to load an exported file (printed by the CLI and the demo)."""
    if fmt == "tflite":
        return f'load it: tf.lite.Interpreter(model_path="{path}")'
    return f'load it: tf.keras.models.load_model("{path}")'
