"""The exception hierarchy shared by the core, the adapters and the functions.

Every error carries a message that says what is wrong *and* what to do about it.
Functions map these to HTTP status codes with :func:`http_status_for`.

Permanent vs transient (one rule, applied by :func:`fedcompute.web.dispatch_event`): a
:class:`FedComputeError` that is not a :class:`TransientError` is permanent — logged and
acknowledged, since redelivering the event cannot succeed; a :class:`TransientError` or any
exception outside this hierarchy (a bug, a client library's outage) propagates so Pub/Sub
redelivers it (and dead-letters it after the subscription's max attempts). The core raises
only this hierarchy for faults it can classify: :class:`InvariantError` replaces bare
``ValueError`` for permanent ones.
"""
from __future__ import annotations


class FedComputeError(Exception):
    """Base class. ``hint`` is an optional fix suggestion appended to the message."""

    http_status = 500

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


class InvalidRequestError(FedComputeError):
    """The caller sent something malformed or semantically wrong (HTTP 400)."""

    http_status = 400


class ConfigError(InvalidRequestError):
    """A task config is invalid. ``location`` is a line number or a JSON path."""

    def __init__(self, message: str, *, location: str | None = None, hint: str | None = None) -> None:
        self.location = location
        prefix = f"{location}: " if location else ""
        super().__init__(prefix + message, hint=hint)


class UnauthenticatedError(FedComputeError):
    """Missing or wrong credentials, e.g. the task builder's API key (HTTP 401)."""

    http_status = 401


class PermissionDeniedError(FedComputeError):
    """Credentials are valid but do not allow this action (HTTP 403)."""

    http_status = 403


class NotFoundError(FedComputeError):
    """A population, task, round or assignment does not exist (HTTP 404)."""

    http_status = 404


class ConflictError(FedComputeError):
    """The request conflicts with current state, e.g. a second active task (HTTP 409)."""

    http_status = 409


class PreconditionFailedError(FedComputeError):
    """A conditional write lost: the state moved on (HTTP 412)."""

    http_status = 412


class PayloadTooLargeError(InvalidRequestError):
    """A request or upload body is larger than allowed (HTTP 413)."""

    http_status = 413


class TransientError(FedComputeError):
    """A dependency is temporarily unavailable; retrying later may succeed (HTTP 503)."""

    http_status = 503


class ArtifactBuildError(FedComputeError):
    """The task builder could not build the artifacts (bad model, unsupported ops, DP)."""

    http_status = 400


class DeviceComputationError(FedComputeError):
    """A simulated device cannot run the plan. ``result`` names the ODP
    ``ReportResultRequest.Result`` it reports (``FAILED_OPS_ERROR``, ``FAILED_MODEL_COMPUTATION``)."""

    def __init__(self, result: str, message: str, *, hint: str | None = None) -> None:
        self.result = result
        super().__init__(message, hint=hint)


class InvariantError(FedComputeError, ValueError):
    """A value the server computes with breaks an invariant of the core (a bad argument from
    the caller, a corrupt checkpoint or state): permanent, since retrying recomputes the same
    thing. Also a ValueError, so callers that check arguments as ValueErrors still do (HTTP 500)."""


class StackError(FedComputeError):
    """The local emulator stack could not be started, reached or stopped."""


def http_status_for(error: BaseException) -> int:
    """HTTP status for ``error``: its class's status, or 500 for unknown exceptions."""
    return getattr(error, "http_status", 500) if isinstance(error, FedComputeError) else 500
