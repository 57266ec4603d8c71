"""Semantic validation: every problem of a parsed config at once, each with a fix.

:func:`check_task_config` returns all issues (errors and warnings);
:func:`validate_task_config` raises :class:`ConfigValidationError` on errors and
otherwise returns the normalized config, its :class:`TaskSpec` and the warnings.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from fedcompute.config.defaults import ADAPTIVE_DP_TYPES, normalize
from fedcompute.config.issues import ERROR, WARNING, ConfigIssue, ConfigValidationError
from fedcompute.config.locations import line_for
from fedcompute.config.parse import ParsedConfig
from fedcompute.config.spec import TaskSpec, parse_checkpoint_selector, spec_from_normalized
from fedcompute.limits import (
    MAX_BATCH_SIZE,
    MAX_EPOCHS,
    MAX_POPULATION_SIZE,
    MAX_REPORT_GOAL,
    MAX_TRAINING_ROUNDS,
)
from fedcompute.metric_names import closest_allowed, is_allowed
from fedcompute.proto import task_config_pb2 as pb

# A population name is a storage path segment and a Firestore document id.
POPULATION_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,127}")  # used with fullmatch

_LP = "federated_learning.learning_process"
_RUNTIME = f"{_LP}.runtime_config"
_EVAL = "federated_learning.evaluation"
_RELEASE = "policies.model_release_policy"
_DATASET = "policies.dataset_policy"
_DP = "differential_privacy"


@dataclass(frozen=True)
class ValidatedConfig:
    """A valid config: ``config`` is normalized (defaults explicit), ``spec`` its typed view."""

    config: pb.TaskConfig
    spec: TaskSpec
    warnings: tuple[ConfigIssue, ...] = ()
    source: str = "<config>"


def _sanitize_population(name: str) -> str:
    cleaned = re.sub(r"[^a-z0-9_-]+", "_", name.strip().lower()).strip("_-")
    return cleaned[:128] or "my_population"


def _fmt(value: float) -> str:
    return repr(value) if isinstance(value, float) else str(value)


class _Checker:
    def __init__(self, raw: pb.TaskConfig, locations: dict[str, int], source: str | None) -> None:
        self.raw = raw
        self.config = normalize(raw)
        self.locations = locations
        self.source = source
        self.issues: list[ConfigIssue] = []

    def add(self, path: str, message: str, fix: str | None = None, severity: str = ERROR) -> None:
        self.issues.append(ConfigIssue(path, message, fix, severity, line_for(self.locations, path), self.source))

    # -- helpers ---------------------------------------------------------------
    def positive(self, path: str, value: float, fix: str, *, allow_zero: bool = False) -> None:
        bad = not math.isfinite(value) or (value < 0 if allow_zero else value <= 0)
        if bad:
            bound = ">= 0" if allow_zero else "> 0"
            self.add(path, f"{path.rsplit('.', 1)[-1]} must be {bound}, got {_fmt(value)}", fix)

    def at_most(self, path: str, value: int, bound: int, fix: str) -> None:
        if value > bound:
            self.add(path, f"{path.rsplit('.', 1)[-1]} must be at most {bound:,}, got {value:,}", fix)

    def fraction(self, path: str, value: float, fix: str) -> None:
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            self.add(path, f"{path.rsplit('.', 1)[-1]} must be in [0, 1], got {_fmt(value)}", fix)

    def known_enum(self, path: str, wrapper: type, value: int) -> bool:
        enum = wrapper.Enum  # type: ignore[attr-defined]
        if value in enum.values():
            return True
        names = ", ".join(n for n, _ in enum.items() if n != "UNKNOWN")  # an EnumTypeWrapper is not iterable
        self.add(path, f"unknown {wrapper.__name__} value {value}", f"use one of {names}")
        return False

    # -- checks ----------------------------------------------------------------
    def run(self) -> list[ConfigIssue]:
        c = self.config
        self.check_population(c)
        mode_ok = self.check_mode(c)
        training = c.mode in (pb.TaskMode.TRAINING_ONLY, pb.TaskMode.TRAINING_AND_EVAL)
        self.check_learning(c, training)
        self.check_policies(c, training)
        if mode_ok:
            self.check_evaluation(c)
        self.check_dp(c)
        self.check_metrics(c)
        # Report in file order when lines are known (stable: check order otherwise).
        return sorted(self.issues, key=lambda issue: issue.line if issue.line is not None else 0)

    def check_population(self, c: pb.TaskConfig) -> None:
        if not c.population_name:
            self.add("population_name", "population_name is required",
                     'set population_name: "my_population" using lowercase letters, digits, _ and -')
        elif not POPULATION_NAME_RE.fullmatch(c.population_name):
            self.add(
                "population_name",
                f"population_name {c.population_name!r} may only contain lowercase letters, digits, "
                "'_' and '-' (starting with a letter or digit, at most 128 characters): it is a "
                "storage path segment",
                f'use population_name: "{_sanitize_population(c.population_name)}"',
            )

    def check_mode(self, c: pb.TaskConfig) -> bool:
        if c.mode == pb.TaskMode.UNKNOWN:
            self.add("mode", "mode is required", "set mode: TRAINING_ONLY, TRAINING_AND_EVAL or EVAL_ONLY")
            return False
        return self.known_enum("mode", pb.TaskMode, c.mode)

    def check_learning(self, c: pb.TaskConfig, training: bool) -> None:
        lp = c.federated_learning.learning_process
        self.known_enum(f"{_LP}.type", pb.LearningAlgo, lp.type)
        self.known_enum(f"{_LP}.client_optimizer", pb.Optimizer, lp.client_optimizer)
        self.known_enum(f"{_LP}.server_optimizer", pb.Optimizer, lp.server_optimizer)
        self.positive(f"{_LP}.client_learning_rate", lp.client_learning_rate,
                      "use a positive learning rate such as 0.1, or remove it for the default 0.1")
        self.positive(f"{_LP}.server_learning_rate", lp.server_learning_rate,
                      "use a positive learning rate such as 1.0, or remove it for the default 1.0")
        self.fraction(f"{_RUNTIME}.over_selection_rate", lp.runtime_config.over_selection_rate,
                      "use a fraction such as 0.3 for 30% extra devices, or remove it for the default 0.3")
        if training and lp.runtime_config.report_goal <= 0:
            got = lp.runtime_config.report_goal
            self.add(f"{_RUNTIME}.report_goal",
                     "report_goal is required for training" if got == 0 else f"report_goal must be > 0, got {got}",
                     "set federated_learning { learning_process { runtime_config { report_goal: N } } }, "
                     "the number of device reports per round")
        self.at_most(f"{_RUNTIME}.report_goal", lp.runtime_config.report_goal, MAX_REPORT_GOAL,
                     "use a report goal of at most a few thousand devices per round")

    def check_policies(self, c: pb.TaskConfig, training: bool) -> None:
        dataset = c.policies.dataset_policy
        if dataset.batch_size <= 0:
            self.add(f"{_DATASET}.batch_size", f"batch_size must be > 0, got {dataset.batch_size}",
                     "use a positive batch size, or remove it for the default 3")
        if dataset.max_training_batches_per_client < 0:
            self.add(f"{_DATASET}.max_training_batches_per_client",
                     f"max_training_batches_per_client must be >= 0, got {dataset.max_training_batches_per_client}",
                     "use 0 for no limit, or a positive number of batches")
        if dataset.num_epochs <= 0:
            self.add(f"{_DATASET}.num_epochs", f"num_epochs must be > 0, got {dataset.num_epochs}",
                     "use 1 or more local epochs, or remove it for the default 1")
        self.at_most(f"{_DATASET}.batch_size", dataset.batch_size, MAX_BATCH_SIZE, "use a smaller batch size")
        self.at_most(f"{_DATASET}.num_epochs", dataset.num_epochs, MAX_EPOCHS, "use fewer local epochs")
        separation = c.policies.min_separation_policy.minimum_separation
        self.at_most("policies.min_separation_policy.minimum_separation", separation, MAX_TRAINING_ROUNDS,
                     "use a separation of at most the number of rounds")
        if separation < 0:
            self.add("policies.min_separation_policy.minimum_separation",
                     f"minimum_separation must be >= 0, got {separation}",
                     "use 0 to let devices join every round, or the number of rounds between contributions")

        release = c.policies.model_release_policy
        if training and release.num_max_training_rounds <= 0:
            got = release.num_max_training_rounds
            self.add(f"{_RELEASE}.num_max_training_rounds",
                     "num_max_training_rounds is required for training" if got == 0
                     else f"num_max_training_rounds must be > 0, got {got}",
                     "set policies { model_release_policy { num_max_training_rounds: N } }")
        self.at_most(f"{_RELEASE}.num_max_training_rounds", release.num_max_training_rounds, MAX_TRAINING_ROUNDS,
                     "train for fewer rounds; build a new task to continue")
        self.positive(f"{_RELEASE}.dp_target_epsilon", release.dp_target_epsilon,
                      "use a positive privacy budget such as 10, or remove it for the default 10")
        if not (math.isfinite(release.dp_delta) and 0.0 < release.dp_delta < 1.0):
            self.add(f"{_RELEASE}.dp_delta", f"dp_delta must be in (0, 1), got {_fmt(release.dp_delta)}",
                     "use at most 1/population_size such as 0.000001, or remove it for 1/population_size")
        if release.population_size <= 0:
            self.add(f"{_RELEASE}.population_size", f"population_size must be > 0, got {release.population_size}",
                     "set the number of devices in the population, or remove it for 3,000,000")
        elif release.population_size > MAX_POPULATION_SIZE:
            self.at_most(f"{_RELEASE}.population_size", release.population_size, MAX_POPULATION_SIZE,
                         "set the number of devices in the population")
        else:
            goals = [(f"{_RUNTIME}.report_goal", c.federated_learning.learning_process.runtime_config.report_goal)]
            if c.federated_learning.HasField("evaluation"):
                goals.append((f"{_EVAL}.report_goal", c.federated_learning.evaluation.report_goal))
            for path, goal in goals:
                if goal > release.population_size:
                    self.add(f"{_RELEASE}.population_size",
                             f"population_size {release.population_size} is smaller than {path} {goal}",
                             f"raise population_size to at least {goal} or lower the report goal")

    def check_evaluation(self, c: pb.TaskConfig) -> None:
        has_eval = c.federated_learning.HasField("evaluation")
        mode_name = pb.TaskMode.Enum.Name(c.mode)
        if c.mode == pb.TaskMode.TRAINING_ONLY:
            if has_eval:
                self.add(_EVAL, "mode TRAINING_ONLY does not build an evaluation task, but an evaluation block is set",
                         "use mode: TRAINING_AND_EVAL to also evaluate, or remove the evaluation block")
            return
        if not has_eval:
            self.add(_EVAL, f"mode {mode_name} needs an evaluation block",
                     "add federated_learning { evaluation { checkpoint_selector: \"every_1_round\" "
                     "evaluation_traffic: 0.1 report_goal: N } }"
                     + (" or use mode: TRAINING_ONLY" if c.mode == pb.TaskMode.TRAINING_AND_EVAL else ""))
            return
        ev = c.federated_learning.evaluation
        if ev.report_goal <= 0:
            self.add(f"{_EVAL}.report_goal",
                     "evaluation report_goal is required" if ev.report_goal == 0
                     else f"evaluation report_goal must be > 0, got {ev.report_goal}",
                     "set evaluation { report_goal: N }, the number of device reports per evaluation round")
        self.at_most(f"{_EVAL}.report_goal", ev.report_goal, MAX_REPORT_GOAL,
                     "use an evaluation report goal of at most a few thousand devices")
        self.fraction(f"{_EVAL}.evaluation_traffic", ev.evaluation_traffic,
                      "use the share of traffic for evaluation, e.g. 0.1")
        self.fraction(f"{_EVAL}.over_selection_rate", ev.over_selection_rate,
                      "use a fraction such as 0.3, or remove it for the default 0.3")
        if parse_checkpoint_selector(ev.checkpoint_selector) is None:
            self.add(f"{_EVAL}.checkpoint_selector",
                     f"checkpoint_selector {ev.checkpoint_selector!r} is not every_<k>_round or every_<k>_hour with k >= 1",
                     'use e.g. "every_1_round" or "every_24_hour"')
        if c.mode == pb.TaskMode.EVAL_ONLY and ev.source_training_task_id <= 0:
            self.add(f"{_EVAL}.source_training_task_id",
                     "EVAL_ONLY needs the id of the training task to evaluate" if ev.source_training_task_id == 0
                     else f"source_training_task_id must be > 0, got {ev.source_training_task_id}",
                     "set evaluation { source_training_task_id: <id of an existing training task> }")
        if ev.source_training_population and not POPULATION_NAME_RE.fullmatch(ev.source_training_population):
            self.add(f"{_EVAL}.source_training_population",
                     f"source_training_population {ev.source_training_population!r} is not a valid population name",
                     f'use "{_sanitize_population(ev.source_training_population)}"')

    def check_dp(self, c: pb.TaskConfig) -> None:
        if not c.HasField("differential_privacy"):
            if c.mode in (pb.TaskMode.TRAINING_ONLY, pb.TaskMode.TRAINING_AND_EVAL):
                self.add(_DP, "no differential_privacy block: updates are aggregated without DP noise",
                         "add differential_privacy { type: FIXED_GAUSSIAN clip_norm: 0.1 noise_multiplier: 0.1 }",
                         severity=WARNING)
            return
        dp = c.differential_privacy
        if dp.type == pb.DpAggregator.UNKNOWN:
            self.add(f"{_DP}.type", "differential_privacy.type is required when differential_privacy is set",
                     "set type: FIXED_GAUSSIAN, TREE_AGGREGATION, TREE, ADAPTIVE_GAUSSIAN or ADAPTIVE_TREE")
            return
        if not self.known_enum(f"{_DP}.type", pb.DpAggregator, dp.type):
            return
        adaptive = dp.type in ADAPTIVE_DP_TYPES
        if dp.HasField("noise_multiplier") and not (math.isfinite(dp.noise_multiplier) and dp.noise_multiplier >= 0):
            self.add(f"{_DP}.noise_multiplier", f"noise_multiplier must be >= 0, got {_fmt(dp.noise_multiplier)}",
                     "use e.g. noise_multiplier: 0.1, or remove it to calibrate the noise to dp_target_epsilon")
        if dp.HasField("clip_norm"):
            self.positive(f"{_DP}.clip_norm", dp.clip_norm, "use a positive L2 clipping norm, e.g. clip_norm: 0.1")
        elif not adaptive:
            self.add(f"{_DP}.clip_norm", "clip_norm is required for this DP type",
                     "set clip_norm: the L2 norm each client update is clipped to, e.g. 0.1")
        if adaptive:
            if dp.HasField("init_clip_norm"):
                self.positive(f"{_DP}.init_clip_norm", dp.init_clip_norm,
                              "use a positive initial clipping norm, or remove it to start from clip_norm")
            else:
                self.add(f"{_DP}.init_clip_norm", "adaptive DP types need an initial clipping norm",
                         "set init_clip_norm or clip_norm, e.g. 0.1")
            q = dp.target_unclipped_quantile
            if not (math.isfinite(q) and 0.0 < q < 1.0):
                self.add(f"{_DP}.target_unclipped_quantile",
                         f"target_unclipped_quantile must be in (0, 1), got {_fmt(q)}",
                         "use e.g. 0.5 to leave half of the updates unclipped, or remove it for 0.5")
            self.positive(f"{_DP}.clip_learning_rate", dp.clip_learning_rate,
                          "use e.g. clip_learning_rate: 0.2, or remove it for 0.2")
            if dp.HasField("clipped_count_stddev"):
                self.positive(f"{_DP}.clipped_count_stddev", dp.clipped_count_stddev,
                              "use a non-negative stddev, or remove it for 0.05 x report_goal", allow_zero=True)
        elif dp.HasField("init_clip_norm"):
            self.add(f"{_DP}.init_clip_norm",
                     f"init_clip_norm is ignored by {pb.DpAggregator.Enum.Name(dp.type)}: only adaptive types use it",
                     "remove it, or use ADAPTIVE_GAUSSIAN / ADAPTIVE_TREE", severity=WARNING)

    def check_metrics(self, c: pb.TaskConfig) -> None:
        seen: dict[str, int] = {}
        for index, metric in enumerate(c.federated_learning.learning_process.metrics):
            path = f"{_LP}.metrics[{index}].name"
            name = metric.name
            if not name.strip():
                self.add(path, "metric name is empty", 'set name: "<metric>", e.g. "binary_accuracy", or remove the metrics block')
                continue
            if name in seen:
                self.add(path, f"metric {name!r} is listed twice, first at metrics[{seen[name]}]",
                         "remove the duplicate metrics block")
                continue
            seen[name] = index
            if not is_allowed(name):
                suggestion = closest_allowed(name)
                self.add(path, f"metric {name!r} is not in the allow-list and will be rejected by the task builder",
                         f'did you mean "{suggestion}"?' if suggestion else "see fedcompute.metric_names.ALLOWED_METRICS",
                         severity=WARNING)


def check_task_config(config: pb.TaskConfig | ParsedConfig) -> list[ConfigIssue]:
    """Every semantic issue (errors and warnings) of ``config``, in field order.

    Give a :class:`ParsedConfig` to get line numbers in the issues.
    """
    if isinstance(config, ParsedConfig):
        return _Checker(config.config, config.locations, config.source).run()
    return _Checker(config, {}, None).run()


def validate_task_config(config: pb.TaskConfig | ParsedConfig) -> ValidatedConfig:
    """Validate, normalize and type ``config``; raise ConfigValidationError listing every error."""
    if isinstance(config, ParsedConfig):
        checker = _Checker(config.config, config.locations, config.source)
        source = config.source
    else:
        checker = _Checker(config, {}, None)
        source = "<config>"
    issues = checker.run()
    errors = [issue for issue in issues if issue.severity == ERROR]
    if errors:
        raise ConfigValidationError(errors, source=source)
    warnings = tuple(issue for issue in issues if issue.severity == WARNING)
    return ValidatedConfig(checker.config, spec_from_normalized(checker.config), warnings, source)


def task_spec(config: pb.TaskConfig | ParsedConfig) -> TaskSpec:
    """The typed spec of a valid config (raises ConfigValidationError otherwise)."""
    return validate_task_config(config).spec
