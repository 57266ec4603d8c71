"""A scripted session runner for worker-process fleet tests (importable by spawned workers)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from fedcompute.fleet.device import SessionOutcome
from fedcompute.fleet.workers import SessionJob, SessionReport

_LOADS = 0  # "model loads" in this process


@dataclass(frozen=True)
class ScriptedRunnerFactory:
    """Devices whose id is a multiple of ``reject_every`` are rejected on their first session."""

    reject_every: int = 0
    retry_after_s: float = 0.0
    crash_device: int = -1

    def __call__(self) -> ScriptedRunner:
        global _LOADS
        _LOADS += 1  # what a real runner pays once: loading the model
        return ScriptedRunner(self)


class ScriptedRunner:
    def __init__(self, factory: ScriptedRunnerFactory) -> None:
        self.factory = factory

    def close(self) -> None:
        pass

    def run(self, job: SessionJob) -> SessionReport:
        if job.device_id == self.factory.crash_device:
            raise ZeroDivisionError("scripted crash")
        # The device's history must come back with every job: one entry per upload so far.
        detail = f"loads={_LOADS} history={len(job.last_contribution)} t={time.monotonic():.6f}"
        first = job.session_index == 0
        if first and self.factory.reject_every and job.device_id % self.factory.reject_every == 0:
            outcome = SessionOutcome("REJECTED", retry_after=self.factory.retry_after_s, detail=detail)
            history = job.last_contribution
        else:
            round_number = job.session_index + 1
            outcome = SessionOutcome("UPLOADED", task_id="1", round_number=round_number, detail=detail)
            history = job.last_contribution + ((f"round{round_number}", round_number),)
        return SessionReport(job.device_id, outcome, history, wall_s=0.002, cpu_s=0.002, compute_s=0.001,
                             compute_cpu_s=0.0015, steps_s={"check_in": 0.0005}, worker_pid=os.getpid())
