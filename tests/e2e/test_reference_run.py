"""The in-process reference run computes what the stack computes for the same devices.

The private demo's non-private curve comes from :mod:`fedcompute.fleet.reference`, which
claims to run the task's own plan, device step, clipping and server round without the
protocol. With every device in every round (report_goal = population) both paths aggregate the
same updates, so their client checkpoints must agree up to float summation order. The server
optimizer is SGD here: Adam's first steps are ±learning rate per coordinate whatever the
gradient's size, so a near-zero coordinate whose sign depends on summation order would differ
by twice the learning rate.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedcompute import layout
from fedcompute.adapters.firestore_store import FirestoreTaskStore
from fedcompute.fleet.population import PopulationSpec
from fedcompute.fleet.reference import load_reference_task, run_reference
from fedcompute.learning.tensor_codec import decode_bundle
from fedcompute.private_demo import PrivateDemoOptions, _Stack, one_run, save_model
from support.stack_plugin import StackHandle

pytestmark = pytest.mark.e2e

DEVICES, ROUNDS = 10, 2


def test_reference_run_matches_the_stack_when_every_device_reports(local_stack: StackHandle, tmp_path: Path) -> None:
    options = PrivateDemoOptions(devices=DEVICES, examples_per_device=6, report_goal=DEVICES, rounds=ROUNDS,
                                 noise=0.0, target_epsilon=10.0, server_optimizer="SGD",
                                 server_lr=1.0, processes=1, threads=4, time_scale=0.01,
                                 out_dir=tmp_path / "out", timeout_s=300, baseline="none")
    stack = _Stack(options, local_stack.stack)
    model_dir = save_model(tmp_path / "out" / "model", options.seed)
    run = one_run(stack, options, model_dir, 0.0, "stack")
    assert [r["round"] for r in run.rounds] == list(range(1, ROUNDS + 1))

    task = load_reference_task(FirestoreTaskStore(local_stack.clients.firestore), stack.blobs,
                               stack.settings.model_bucket, run.population, run.task_id)
    spec = PopulationSpec(num_devices=DEVICES, examples_per_device=6, seed=options.seed)
    history = run_reference(task, spec, population=run.population, report_goal=DEVICES, rounds=ROUNDS,
                            processes=1)
    assert len(history) == ROUNDS
    initial, _ = decode_bundle(task.client_checkpoint)
    for round_number, reference in enumerate(history, start=1):
        stored, _ = decode_bundle(stack.blobs.read(
            stack.settings.model_bucket, layout.client_checkpoint_path(run.population, run.task_id, round_number)))
        assert [name for name, _ in reference] == [name for name, _ in stored]
        for (name, ours), (_, theirs), (_, start) in zip(reference, stored, initial):
            assert not np.allclose(theirs, start), f"{name} did not train in round {round_number}"
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6, err_msg=f"{name}, round {round_number}")
