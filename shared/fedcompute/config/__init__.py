"""Task config: parse (text format or JSON), validate, normalize, type.

No TensorFlow here (nor anywhere it imports): light functions and the CLI use it.

Typical use::

    from fedcompute import config as cfg
    validated = cfg.load_and_validate("fcp_server_config.pbtxt")   # raises ConfigError subclasses
    spec = validated.spec            # TaskSpec: plain Python values, defaults applied
    proto = validated.config         # normalized TaskConfig protobuf
    for warning in validated.warnings: print(warning)

Errors: :class:`ConfigSyntaxError` (does not parse; ``file:line:col`` and a "did you
mean"), :class:`ConfigValidationError` (parses but invalid; ``issues`` lists every error
with its field path, line and fix). Both are :class:`fedcompute.errors.ConfigError`.
"""
from __future__ import annotations

from pathlib import Path

from fedcompute.config.defaults import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHECKPOINT_SELECTOR,
    DEFAULT_CLIENT_LEARNING_RATE,
    DEFAULT_CLIP_LEARNING_RATE,
    DEFAULT_CLIPPED_COUNT_STDDEV_FRACTION,
    DEFAULT_DP_TARGET_EPSILON,
    DEFAULT_EVALUATION_TRAFFIC,
    DEFAULT_LABEL_NAME,
    DEFAULT_NUM_EPOCHS,
    DEFAULT_OVER_SELECTION_RATE,
    DEFAULT_POPULATION_SIZE,
    DEFAULT_SERVER_LEARNING_RATE,
    DEFAULT_TARGET_UNCLIPPED_QUANTILE,
    normalize,
)
from fedcompute.config.issues import ConfigIssue, ConfigSyntaxError, ConfigValidationError
from fedcompute.config.parse import (
    ParsedConfig,
    TaskConfig,
    detect_format,
    load_config_document,
    load_task_config,
    parse_config_document,
    parse_task_config,
)
from fedcompute.config.render import to_json, to_text
from fedcompute.config.spec import (
    EVAL_ONLY,
    TRAINING_AND_EVAL,
    TRAINING_ONLY,
    CheckpointSelector,
    DpSpec,
    EvalSpec,
    TaskSpec,
    max_aggregation_size,
    parse_checkpoint_selector,
)
from fedcompute.config.validate import ValidatedConfig, check_task_config, task_spec, validate_task_config


def validate_text(text: str | bytes, *, source: str = "<config>") -> ValidatedConfig:
    """Parse and validate config text (errors name lines)."""
    return validate_task_config(parse_config_document(text, source=source))


def load_and_validate(path: str | Path) -> ValidatedConfig:
    """Read, parse and validate the config file at ``path`` (errors name lines)."""
    return validate_task_config(load_config_document(path))


__all__ = [
    "DEFAULT_BATCH_SIZE", "DEFAULT_CHECKPOINT_SELECTOR", "DEFAULT_CLIENT_LEARNING_RATE",
    "DEFAULT_CLIP_LEARNING_RATE", "DEFAULT_CLIPPED_COUNT_STDDEV_FRACTION", "DEFAULT_DP_TARGET_EPSILON",
    "DEFAULT_EVALUATION_TRAFFIC", "DEFAULT_LABEL_NAME", "DEFAULT_NUM_EPOCHS", "DEFAULT_OVER_SELECTION_RATE",
    "DEFAULT_POPULATION_SIZE", "DEFAULT_SERVER_LEARNING_RATE", "DEFAULT_TARGET_UNCLIPPED_QUANTILE",
    "EVAL_ONLY", "TRAINING_AND_EVAL", "TRAINING_ONLY",
    "CheckpointSelector", "ConfigIssue", "ConfigSyntaxError", "ConfigValidationError", "DpSpec", "EvalSpec",
    "ParsedConfig", "TaskConfig", "TaskSpec", "ValidatedConfig",
    "check_task_config", "detect_format", "load_and_validate", "load_config_document", "load_task_config",
    "max_aggregation_size", "normalize", "parse_checkpoint_selector", "parse_config_document",
    "parse_task_config", "task_spec", "to_json", "to_text", "validate_task_config", "validate_text",
]
