"""The local serverless stack (emulators + functions on loopback). No TensorFlow here.

Use :class:`LocalStack`; the CLI is ``fedcompute stack up|down|status|env``.
"""
from fedcompute.stack.local import (
    ALL_FUNCTIONS,
    DEFAULT_TASK_BUILDER_PORT,
    FUNCTION_SPECS,
    ComponentStatus,
    FunctionSpec,
    LocalStack,
    StackStatus,
    push_subscription_name,
)
from fedcompute.stack.procs import kill_worker_binaries

__all__ = [
    "ALL_FUNCTIONS",
    "DEFAULT_TASK_BUILDER_PORT",
    "FUNCTION_SPECS",
    "ComponentStatus",
    "FunctionSpec",
    "LocalStack",
    "StackStatus",
    "kill_worker_binaries",
    "push_subscription_name",
]
