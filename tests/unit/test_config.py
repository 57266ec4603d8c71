"""Task config: parsing (text format, JSON), errors with lines and suggestions, validation,
normalization, typed spec, CLI. Pure: no network, no TensorFlow."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import fedcompute.config as cfg
from fedcompute.config import ConfigSyntaxError, ConfigValidationError
from fedcompute.errors import ConfigError
from fedcompute.proto import task_config_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "configs"
PYTHON = sys.executable

VALID = """\
population_name: "pop_a"
mode: TRAINING_AND_EVAL
policies {
  min_separation_policy {
    minimum_separation: 1
  }
  model_release_policy {
    num_max_training_rounds: 100
  }
}
federated_learning {
  learning_process {
    type: FED_AVG
    client_optimizer: SGD
    client_learning_rate: 0.01
    server_optimizer: ADAM
    server_learning_rate: 1
    runtime_config {
      report_goal: 50
    }
    metrics {
      name: "binary_accuracy"
    }
  }
  evaluation {
    checkpoint_selector: "every_1_round"
    evaluation_traffic: 0.1
    report_goal: 20
  }
}
differential_privacy {
  type: FIXED_GAUSSIAN
  noise_multiplier: 0.1
  clip_norm: 0.1
}
"""


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing ``needle``."""
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in text")


def validation_errors(text: str) -> list[cfg.ConfigIssue]:
    with pytest.raises(ConfigValidationError) as info:
        cfg.validate_text(text, source="bad.pbtxt")
    return list(info.value.issues)


# ------------------------------------------------------------------ the seed's configs


def test_seed_step3_fails_only_on_the_sever_typo_with_suggestion_and_line() -> None:
    path = CONFIGS / "seed_step3_fcp_server_config.pbtxt"
    text = path.read_text()
    with pytest.raises(ConfigSyntaxError) as info:
        cfg.load_task_config(path)
    err = info.value
    assert err.line == line_of(text, "sever_learning_rate") == 47
    assert err.column == 7
    assert err.token == "sever_learning_rate"
    assert err.suggestion == "server_learning_rate"
    assert err.path == "federated_learning.learning_process.sever_learning_rate"
    assert f"{path}:47:7" in str(err)
    assert 'did you mean "server_learning_rate"' in str(err)
    assert isinstance(err, ConfigError) and err.http_status == 400

    # Fixing that one token makes the whole config valid: it was the only problem.
    fixed = text.replace("sever_learning_rate", "server_learning_rate")
    validated = cfg.validate_text(fixed, source="fixed.pbtxt")
    assert validated.warnings == ()
    assert validated.spec.server_learning_rate == 1.0
    assert (CONFIGS / "fcp_server_config.pbtxt").read_text() == fixed


def test_seed_step3_values_reach_the_spec() -> None:
    spec = cfg.load_and_validate(CONFIGS / "fcp_server_config.pbtxt").spec
    assert spec.population_name == "my_new_population"
    assert spec.mode == cfg.TRAINING_AND_EVAL
    assert spec.min_separation == 3
    assert spec.num_rounds == 1000
    assert (spec.learning_algo, spec.client_optimizer, spec.server_optimizer) == ("FED_AVG", "SGD", "ADAM")
    assert spec.client_learning_rate == 0.01
    assert spec.report_goal == 2000
    assert spec.metrics == ("auc-roc", "binary_accuracy")
    assert spec.evaluation is not None
    assert spec.evaluation.source_training_task_id == 1
    assert spec.evaluation.checkpoint_selector == cfg.CheckpointSelector("round", 1)
    assert spec.evaluation.traffic == 0.1 and spec.evaluation.report_goal == 200
    assert spec.dp is not None
    assert (spec.dp.aggregator, spec.dp.noise_multiplier, spec.dp.clip_norm) == ("FIXED_GAUSSIAN", 0.1, 0.1)


def test_json_example_equals_the_text_example() -> None:
    from_json = cfg.load_task_config(CONFIGS / "fcp_server_config.json")
    from_text = cfg.load_task_config(CONFIGS / "fcp_server_config.pbtxt")
    assert from_json == from_text


@pytest.mark.parametrize(
    "name", ["fcp_server_config.pbtxt", "fcp_server_config.json", "emnist_cnn_task_config.pbtxt",
             "dict_model_task_config.pbtxt", "tree_dp_task_config.pbtxt",
             "fashion_logreg_private_task_config.pbtxt"],
)
def test_complete_examples_validate_without_warnings(name: str) -> None:
    validated = cfg.load_and_validate(CONFIGS / name)
    assert validated.warnings == ()
    assert validated.spec.rejected_metrics == ()


def test_private_small_model_example_passes_fedcompute_config_validate_and_the_dp_check() -> None:
    from fedcompute.cli.main import main
    from fedcompute.privacy import check_dp

    path = CONFIGS / "fashion_logreg_private_task_config.pbtxt"
    assert main(["config", "validate", "--quiet", str(path)]) == 0
    spec = cfg.load_and_validate(path).spec
    assert (spec.population_size, spec.report_goal, spec.num_rounds, spec.delta) == (10_000, 1000, 25, 1e-4)
    assert spec.dp is not None and spec.dp.noise_seed is None
    result = check_dp(spec.dp.aggregator, noise_multiplier=spec.dp.noise_multiplier, clip_norm=spec.dp.clip_norm,
                      report_goal=spec.report_goal, rounds=spec.num_rounds, target_epsilon=spec.target_epsilon,
                      delta=spec.delta, population_size=spec.population_size)
    assert result.passed and result.epsilon == pytest.approx(3.15, abs=0.01)  # the comment in the file


def test_dict_model_example_keeps_its_label_and_binary_metrics() -> None:
    spec = cfg.load_and_validate(CONFIGS / "dict_model_task_config.pbtxt").spec
    assert spec.label_name == "my_label"
    assert spec.accepted_metrics == ("binary_accuracy", "binary_crossentropy", "recall", "precision", "auc-roc", "auc-pr")
    assert spec.delta == 0.000001 and spec.target_epsilon == 10


def test_emnist_example_uses_population_size_extension() -> None:
    spec = cfg.load_and_validate(CONFIGS / "emnist_cnn_task_config.pbtxt").spec
    assert spec.population_size == 3400
    assert spec.sampling_rate == pytest.approx(50 / 3400)
    assert spec.metrics == ("sparse_categorical_accuracy", "sparse_categorical_crossentropy")


@pytest.mark.parametrize(
    "name, expected_paths",
    [
        ("seed_metrics_fragment.pbtxt", {"population_name", "mode"}),
        ("seed_dp_settings_fragment.pbtxt", {"population_name", "mode"}),
        ("seed_label_name_fragment.pbtxt", {
            "federated_learning.learning_process.runtime_config.report_goal",
            "policies.model_release_policy.num_max_training_rounds",
            "federated_learning.evaluation",
        }),
    ],
)
def test_seed_fragments_parse_but_are_incomplete(name: str, expected_paths: set[str]) -> None:
    document = cfg.load_config_document(CONFIGS / name)  # parses: no exception
    with pytest.raises(ConfigValidationError) as info:
        cfg.validate_task_config(document)
    assert {issue.path for issue in info.value.issues} == expected_paths


def test_seed_fragments_values() -> None:
    metrics = cfg.load_task_config(CONFIGS / "seed_metrics_fragment.pbtxt")
    assert [m.name for m in metrics.federated_learning.learning_process.metrics] == [
        "binary_accuracy", "binary_crossentropy", "recall", "precision", "auc-roc", "auc-pr"]
    dp = cfg.load_task_config(CONFIGS / "seed_dp_settings_fragment.pbtxt")
    assert dp.policies.model_release_policy.dp_delta == 0.000001
    assert dp.differential_privacy.type == pb.DpAggregator.FIXED_GAUSSIAN
    label = cfg.load_task_config(CONFIGS / "seed_label_name_fragment.pbtxt")
    assert (label.mode, label.label_name) == (pb.TaskMode.TRAINING_AND_EVAL, "my_label")


def test_tree_is_accepted_as_tree_aggregation() -> None:
    for name in ("TREE", "TREE_AGGREGATION"):
        text = VALID.replace("type: FIXED_GAUSSIAN", f"type: {name}")
        validated = cfg.validate_text(text)
        assert validated.config.differential_privacy.type == pb.DpAggregator.TREE_AGGREGATION
        assert validated.spec.dp is not None and validated.spec.dp.aggregator == "TREE_AGGREGATION"
        assert validated.spec.dp.is_tree and not validated.spec.dp.is_adaptive
        assert "type: TREE_AGGREGATION" in cfg.to_text(validated.config)


@pytest.mark.parametrize(
    "old, new, token, suggestion, enum_or_field",
    [
        ("type: FIXED_GAUSSIAN", "type: ADADPTIVE_TREE", "ADADPTIVE_TREE", "ADAPTIVE_TREE", "DpAggregator"),
        ("type: FED_AVG", "type: FED_SDG", "FED_SDG", "FED_SGD", "LearningAlgo"),
        ("client_optimizer: SGD", "client_optimizer: ADAMM", "ADAMM", "ADAM", "Optimizer"),
        ("mode: TRAINING_AND_EVAL", "mode: TRAINING_AND_EVALUATION", "TRAINING_AND_EVALUATION", "TRAINING_AND_EVAL", "TaskMode"),
        ("report_goal: 50", "reprot_goal: 50", "reprot_goal", "report_goal", "RuntimeConfig"),
        ("minimum_separation: 1", "minimum_seperation: 1", "minimum_seperation", "minimum_separation", "MinimumSeparationPolicy"),
        ("checkpoint_selector:", "checkpoint_selecter:", "checkpoint_selecter", "checkpoint_selector", "Evaluation"),
        ('name: "binary_accuracy"', 'nmae: "binary_accuracy"', "nmae", "name", "Metric"),
    ],
)
def test_unknown_names_get_line_column_and_closest_valid_name(
    old: str, new: str, token: str, suggestion: str, enum_or_field: str
) -> None:
    text = VALID.replace(old, new, 1)
    with pytest.raises(ConfigSyntaxError) as info:
        cfg.parse_task_config(text, source="typo.pbtxt")
    err = info.value
    line = line_of(text, new)
    assert (err.line, err.token, err.suggestion) == (line, token, suggestion)
    assert err.column == text.splitlines()[line - 1].index(token) + 1
    assert f"typo.pbtxt:{line}:{err.column}: " in str(err)
    assert enum_or_field in str(err)
    assert f'did you mean "{suggestion}"' in str(err)


def test_unknown_field_with_nothing_close_lists_the_valid_fields() -> None:
    text = VALID.replace("report_goal: 50", "zzz: 50")
    with pytest.raises(ConfigSyntaxError) as info:
        cfg.parse_task_config(text)
    assert info.value.suggestion is None
    assert "valid fields: report_goal, over_selection_rate, example_selector_uri" in str(info.value)
    assert info.value.path == "federated_learning.learning_process.runtime_config.zzz"


def test_suggestions_come_from_the_enclosing_message_only() -> None:
    # "population_name" is a TaskConfig field; inside RuntimeConfig it is not suggested.
    text = VALID.replace("report_goal: 50", 'population_nam: "x"')
    with pytest.raises(ConfigSyntaxError) as info:
        cfg.parse_task_config(text)
    assert info.value.suggestion is None
    top = VALID.replace('population_name: "pop_a"', 'population_nam: "pop_a"')
    with pytest.raises(ConfigSyntaxError) as info:
        cfg.parse_task_config(top)
    assert info.value.suggestion == "population_name"


@pytest.mark.parametrize(
    "old, new, fragment",
    [
        ('population_name: "pop_a"', "population_name: pop_a", 'quote the value: "pop_a"'),
        ("report_goal: 50", "report_goal: 5.5", "use a whole number"),
        ("noise_multiplier: 0.1", "noise_multiplier: lots", "use a number"),
        ("    report_goal: 20\n  }", "    report_goal: 20\n",
         '"differential_privacy" is a field of TaskConfig: is a closing } missing before line 31?'),
        ("  clip_norm: 0.1\n}", "  clip_norm: 0.1\n", 'close every `name {` block with `}`'),
        ("clip_norm: 0.1", "clip_norm: 0.1\n  clip_norm: 0.2", "keep one occurrence"),
    ],
)
def test_text_syntax_errors_are_located_with_a_hint(old: str, new: str, fragment: str) -> None:
    text = VALID.replace(old, new, 1)
    with pytest.raises(ConfigSyntaxError) as info:
        cfg.parse_task_config(text, source="s.pbtxt")
    assert info.value.line is not None and info.value.column is not None
    assert str(info.value).startswith(f"s.pbtxt:{info.value.line}:{info.value.column}: ")
    assert fragment in str(info.value)


# ------------------------------------------------------------------ semantic validation

BAD_CONFIGS = [
    # (id, old, new, expected path, expected message fragment, expected fix fragment)
    ("no population", 'population_name: "pop_a"\n', "", "population_name", "population_name is required", 'population_name: "my_population"'),
    ("unsafe population", 'population_name: "pop_a"', 'population_name: "My Pop/1"', "population_name",
     "may only contain lowercase letters", 'population_name: "my_pop_1"'),
    ("no mode", "mode: TRAINING_AND_EVAL\n", "", "mode", "mode is required", "TRAINING_ONLY, TRAINING_AND_EVAL or EVAL_ONLY"),
    ("zero report goal", "report_goal: 50", "report_goal: 0", "federated_learning.learning_process.runtime_config.report_goal",
     "report_goal is required for training", "report_goal: N"),
    ("negative report goal", "report_goal: 50", "report_goal: -5", "federated_learning.learning_process.runtime_config.report_goal",
     "report_goal must be > 0, got -5", "report_goal: N"),
    ("over selection > 1", "report_goal: 50", "report_goal: 50\n      over_selection_rate: 1.5",
     "federated_learning.learning_process.runtime_config.over_selection_rate", "must be in [0, 1], got 1.5", "0.3"),
    ("zero client lr", "client_learning_rate: 0.01", "client_learning_rate: 0",
     "federated_learning.learning_process.client_learning_rate", "client_learning_rate must be > 0, got 0.0", "0.1"),
    ("nan server lr", "server_learning_rate: 1", "server_learning_rate: nan",
     "federated_learning.learning_process.server_learning_rate", "server_learning_rate must be > 0, got nan", "1.0"),
    ("zero batch", "minimum_separation: 1\n  }", "minimum_separation: 1\n  }\n  dataset_policy {\n    batch_size: 0\n  }",
     "policies.dataset_policy.batch_size", "batch_size must be > 0, got 0", "default 3"),
    ("negative max batches", "minimum_separation: 1\n  }", "minimum_separation: 1\n  }\n  dataset_policy {\n    max_training_batches_per_client: -1\n  }",
     "policies.dataset_policy.max_training_batches_per_client", "must be >= 0, got -1", "0 for no limit"),
    ("zero epochs", "minimum_separation: 1\n  }", "minimum_separation: 1\n  }\n  dataset_policy {\n    num_epochs: 0\n  }",
     "policies.dataset_policy.num_epochs", "num_epochs must be > 0, got 0", "default 1"),
    ("negative separation", "minimum_separation: 1", "minimum_separation: -2",
     "policies.min_separation_policy.minimum_separation", "minimum_separation must be >= 0, got -2", "0 to let devices"),
    ("no rounds", "num_max_training_rounds: 100", "num_max_training_rounds: 0",
     "policies.model_release_policy.num_max_training_rounds", "num_max_training_rounds is required", "num_max_training_rounds: N"),
    ("zero epsilon", "num_max_training_rounds: 100", "num_max_training_rounds: 100\n    dp_target_epsilon: 0",
     "policies.model_release_policy.dp_target_epsilon", "dp_target_epsilon must be > 0, got 0.0", "default 10"),
    ("delta 1", "num_max_training_rounds: 100", "num_max_training_rounds: 100\n    dp_delta: 1",
     "policies.model_release_policy.dp_delta", "dp_delta must be in (0, 1), got 1.0", "1/population_size"),
    ("population below goal", "num_max_training_rounds: 100", "num_max_training_rounds: 100\n    population_size: 30",
     "policies.model_release_policy.population_size",
     "population_size 30 is smaller than federated_learning.learning_process.runtime_config.report_goal 50", "at least 50"),
    ("zero population", "num_max_training_rounds: 100", "num_max_training_rounds: 100\n    population_size: 0",
     "policies.model_release_policy.population_size", "population_size must be > 0, got 0", "3,000,000"),
    ("bad selector", '"every_1_round"', '"each_round"', "federated_learning.evaluation.checkpoint_selector",
     "is not every_<k>_round or every_<k>_hour", '"every_1_round"'),
    ("selector k=0", '"every_1_round"', '"every_0_hour"', "federated_learning.evaluation.checkpoint_selector",
     "with k >= 1", '"every_24_hour"'),
    ("traffic > 1", "evaluation_traffic: 0.1", "evaluation_traffic: 2", "federated_learning.evaluation.evaluation_traffic",
     "evaluation_traffic must be in [0, 1], got 2.0", "0.1"),
    ("eval goal missing", "    report_goal: 20\n", "", "federated_learning.evaluation.report_goal",
     "evaluation report_goal is required", "report_goal: N"),
    ("training only with eval", "mode: TRAINING_AND_EVAL", "mode: TRAINING_ONLY", "federated_learning.evaluation",
     "mode TRAINING_ONLY does not build an evaluation task", "use mode: TRAINING_AND_EVAL"),
    ("eval only without task id", "mode: TRAINING_AND_EVAL", "mode: EVAL_ONLY", "federated_learning.evaluation.source_training_task_id",
     "EVAL_ONLY needs the id of the training task", "source_training_task_id"),
    ("dp without type", "type: FIXED_GAUSSIAN\n", "", "differential_privacy.type", "differential_privacy.type is required",
     "FIXED_GAUSSIAN, TREE_AGGREGATION, TREE"),
    ("unknown dp number", "type: FIXED_GAUSSIAN", "type: 9", "differential_privacy.type", "unknown DpAggregator value 9",
     "ADAPTIVE_TREE"),
    ("zero clip", "clip_norm: 0.1", "clip_norm: 0", "differential_privacy.clip_norm", "clip_norm must be > 0, got 0.0", "clip_norm: 0.1"),
    ("fixed without clip", "  clip_norm: 0.1\n", "", "differential_privacy.clip_norm", "clip_norm is required", "L2 norm"),
    ("negative noise", "noise_multiplier: 0.1", "noise_multiplier: -1", "differential_privacy.noise_multiplier",
     "noise_multiplier must be >= 0, got -1.0", "calibrate"),
    ("adaptive quantile 1", "type: FIXED_GAUSSIAN", "type: ADAPTIVE_GAUSSIAN\n  target_unclipped_quantile: 1",
     "differential_privacy.target_unclipped_quantile", "must be in (0, 1), got 1.0", "0.5"),
    ("adaptive clip lr 0", "type: FIXED_GAUSSIAN", "type: ADAPTIVE_TREE\n  clip_learning_rate: 0",
     "differential_privacy.clip_learning_rate", "clip_learning_rate must be > 0, got 0.0", "0.2"),
    ("adaptive init clip negative", "type: FIXED_GAUSSIAN", "type: ADAPTIVE_GAUSSIAN\n  init_clip_norm: -1",
     "differential_privacy.init_clip_norm", "init_clip_norm must be > 0, got -1.0", "initial clipping norm"),
    ("adaptive no clip at all", "type: FIXED_GAUSSIAN", "type: ADAPTIVE_GAUSSIAN", "differential_privacy.init_clip_norm",
     "adaptive DP types need an initial clipping norm", "init_clip_norm or clip_norm"),
    ("empty metric", 'name: "binary_accuracy"', 'name: ""', "federated_learning.learning_process.metrics[0].name",
     "metric name is empty", 'name: "<metric>"'),
    ("duplicate metric", '      name: "binary_accuracy"\n    }', '      name: "binary_accuracy"\n    }\n    metrics {\n      name: "binary_accuracy"\n    }',
     "federated_learning.learning_process.metrics[1].name", "listed twice, first at metrics[0]", "remove the duplicate"),
]


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=[case[0] for case in BAD_CONFIGS])
def test_bad_config_reports_its_specific_error(case: tuple[str, ...]) -> None:
    _, old, new, path, message, fix = case
    if case[0] == "fixed without clip" or case[0] == "adaptive no clip at all":
        text = VALID.replace(old, new, 1).replace("  clip_norm: 0.1\n", "")
    else:
        assert old in VALID
        text = VALID.replace(old, new, 1)
    errors = validation_errors(text)
    matching = [issue for issue in errors if issue.path == path]
    assert matching, f"no error at {path}: {[str(e) for e in errors]}"
    issue = matching[0]
    assert message in issue.message
    assert issue.fix is not None and fix in issue.fix
    assert issue.source == "bad.pbtxt"
    # The line points at the field, or at its closest written ancestor when it is missing.
    assert issue.line is None or 1 <= issue.line <= len(text.splitlines())
    assert str(issue).startswith("bad.pbtxt")


def test_issue_lines_point_at_the_offending_field() -> None:
    text = VALID.replace("report_goal: 50", "report_goal: -1").replace("clip_norm: 0.1", "clip_norm: -3")
    errors = {issue.path: issue for issue in validation_errors(text)}
    goal = errors["federated_learning.learning_process.runtime_config.report_goal"]
    clip = errors["differential_privacy.clip_norm"]
    assert goal.line == line_of(text, "report_goal: -1")
    assert clip.line == line_of(text, "clip_norm: -3")
    assert str(goal).startswith(f"bad.pbtxt:{goal.line}: federated_learning.learning_process.runtime_config.report_goal: ")
    assert "(fix: " in str(goal)


def test_missing_field_points_at_closest_written_ancestor() -> None:
    text = VALID.replace("      report_goal: 50\n", "")
    (issue,) = [i for i in validation_errors(text) if i.path.endswith("runtime_config.report_goal")]
    assert issue.line == line_of(text, "runtime_config {")


def test_all_errors_are_collected_at_once_in_file_order() -> None:
    text = (VALID.replace("report_goal: 50", "report_goal: 0")
            .replace("client_learning_rate: 0.01", "client_learning_rate: -1")
            .replace("evaluation_traffic: 0.1", "evaluation_traffic: 7")
            .replace("clip_norm: 0.1", "clip_norm: 0"))
    with pytest.raises(ConfigValidationError) as info:
        cfg.validate_text(text, source="many.pbtxt")
    errors = info.value.issues
    assert len(errors) == 4
    lines = [e.line for e in errors]
    assert lines == sorted(lines)
    message = str(info.value)
    assert message.startswith("4 errors in task config many.pbtxt:\n")
    for error in errors:
        assert str(error) in message


def test_unknown_metrics_are_warnings_with_closest_allowed_name() -> None:
    text = VALID.replace('name: "binary_accuracy"', 'name: "binary_acuracy"')
    validated = cfg.validate_text(text, source="w.pbtxt")
    (warning,) = validated.warnings
    assert warning.severity == "warning"
    assert warning.path == "federated_learning.learning_process.metrics[0].name"
    assert warning.line == line_of(text, "binary_acuracy")
    assert 'did you mean "binary_accuracy"' in str(warning)
    assert validated.spec.rejected_metrics == ("binary_acuracy",)
    assert validated.spec.accepted_metrics == ()


def test_missing_dp_block_is_a_warning_not_an_error() -> None:
    text = VALID[: VALID.index("differential_privacy {")]
    validated = cfg.validate_text(text)
    assert validated.spec.dp is None
    assert [w.path for w in validated.warnings] == ["differential_privacy"]


def test_eval_only_with_task_id_is_valid_and_needs_no_training_fields() -> None:
    text = """
population_name: "pop_a"
mode: EVAL_ONLY
federated_learning {
  learning_process { metrics { name: "accuracy" } }
  evaluation {
    source_training_task_id: 4
    checkpoint_selector: "every_6_hour"
    report_goal: 10
  }
}
"""
    spec = cfg.validate_text(text).spec
    assert spec.mode == cfg.EVAL_ONLY and not spec.has_training and spec.has_evaluation
    assert spec.evaluation is not None
    assert spec.evaluation.checkpoint_selector == cfg.CheckpointSelector("hour", 6)
    assert spec.evaluation.source_training_task_id == 4
    assert spec.evaluation.traffic == cfg.DEFAULT_EVALUATION_TRAFFIC


def test_validate_accepts_a_bare_proto_without_locations() -> None:
    config = cfg.parse_task_config(VALID.replace("report_goal: 50", "report_goal: -1"))
    with pytest.raises(ConfigValidationError) as info:
        cfg.validate_task_config(config)
    (issue,) = info.value.issues
    assert issue.line is None and issue.source is None
    assert str(issue).startswith("federated_learning.learning_process.runtime_config.report_goal: ")


# ------------------------------------------------------------------ JSON


def _json_doc() -> dict:
    return json.loads((CONFIGS / "fcp_server_config.json").read_text())


def test_json_unknown_key_names_json_path_and_closest_name() -> None:
    doc = _json_doc()
    learning = doc["federated_learning"]["learning_process"]
    learning["sever_learning_rate"] = learning.pop("server_learning_rate")
    text = json.dumps(doc, indent=2)
    with pytest.raises(ConfigSyntaxError) as info:
        cfg.parse_task_config(text, source="c.json")
    err = info.value
    assert err.path == "$.federated_learning.learning_process.sever_learning_rate"
    assert err.suggestion == "server_learning_rate"
    assert err.line == line_of(text, '"sever_learning_rate"')
    assert "$.federated_learning.learning_process.sever_learning_rate" in str(err)
    assert 'did you mean "server_learning_rate"' in str(err)


def test_json_accepts_camel_case_and_reports_user_spelling_in_path() -> None:
    text = '{"populationName": "p", "federatedLearning": {"learningProcess": {"severLearningRate": 1}}}'
    with pytest.raises(ConfigSyntaxError) as info:
        cfg.parse_task_config(text)
    assert info.value.path == "$.federatedLearning.learningProcess.severLearningRate"
    assert info.value.suggestion == "server_learning_rate"


@pytest.mark.parametrize(
    "mutate, path, fragment",
    [
        (lambda d: d["differential_privacy"].update(type="ADADPTIVE_TREE"), "$.differential_privacy.type",
         'did you mean "ADAPTIVE_TREE"'),
        (lambda d: d["federated_learning"]["learning_process"].update(type="FED_SDG"),
         "$.federated_learning.learning_process.type", 'did you mean "FED_SGD"'),
        (lambda d: d["federated_learning"]["learning_process"]["runtime_config"].update(report_goal="many"),
         "$.federated_learning.learning_process.runtime_config.report_goal", 'must be an integer, got a string "many"'),
        (lambda d: d["federated_learning"]["learning_process"]["metrics"][1].update(nam="x"),
         "$.federated_learning.learning_process.metrics[1].nam", 'did you mean "name"'),
        (lambda d: d["federated_learning"]["learning_process"].update(metrics={"name": "x"}),
         "$.federated_learning.learning_process.metrics", "must be a list"),
        (lambda d: d.update(population_name=12), "$.population_name", "must be a string"),
        (lambda d: d.update(use_daf="yes"), "$.use_daf", "must be true or false"),
        (lambda d: d.update(policies=[1]), "$.policies", "expected an object"),
    ],
)
def test_json_errors_name_their_path(mutate, path: str, fragment: str) -> None:
    doc = _json_doc()
    mutate(doc)
    with pytest.raises(ConfigSyntaxError) as info:
        cfg.parse_task_config(json.dumps(doc, indent=2), source="c.json")
    assert info.value.path == path
    assert fragment in str(info.value)


def test_json_decode_error_and_duplicate_keys() -> None:
    with pytest.raises(ConfigSyntaxError) as info:
        cfg.parse_task_config('{\n  "mode": "TRAINING_ONLY"\n  "population_name": "p"\n}', source="c.json")
    assert (info.value.line, info.value.column) == (3, 3)
    assert "invalid JSON" in str(info.value)
    with pytest.raises(ConfigSyntaxError, match='duplicate JSON key "mode"'):
        cfg.parse_task_config('{"mode": "TRAINING_ONLY", "mode": "EVAL_ONLY"}')


def test_json_validation_errors_carry_lines() -> None:
    doc = _json_doc()
    doc["federated_learning"]["learning_process"]["runtime_config"]["report_goal"] = -3
    text = json.dumps(doc, indent=2)
    (issue,) = validation_errors(text)
    assert issue.path == "federated_learning.learning_process.runtime_config.report_goal"
    assert issue.line == line_of(text, '"report_goal": -3')


# ------------------------------------------------------------------ normalization


def test_normalize_fills_odp_defaults() -> None:
    minimal = """
population_name: "p"
mode: TRAINING_ONLY
policies { model_release_policy { num_max_training_rounds: 5 } }
federated_learning { learning_process { runtime_config { report_goal: 10 } } }
differential_privacy { type: ADAPTIVE_GAUSSIAN clip_norm: 0.5 }
"""
    config = cfg.normalize(cfg.parse_task_config(minimal))
    lp = config.federated_learning.learning_process
    assert config.label_name == "y"
    assert lp.type == pb.LearningAlgo.FED_AVG
    assert lp.client_optimizer == lp.server_optimizer == pb.Optimizer.SGD
    assert (lp.client_learning_rate, lp.server_learning_rate) == (0.1, 1.0)
    assert lp.runtime_config.over_selection_rate == 0.3
    assert config.policies.dataset_policy.batch_size == 3
    assert config.policies.dataset_policy.num_epochs == 1
    release = config.policies.model_release_policy
    assert release.population_size == 3_000_000
    assert release.dp_target_epsilon == 10
    assert release.dp_delta == pytest.approx(1 / 3_000_000)
    dp = config.differential_privacy
    assert dp.init_clip_norm == 0.5
    assert dp.target_unclipped_quantile == 0.5 and dp.clip_learning_rate == 0.2
    assert dp.clipped_count_stddev == pytest.approx(0.05 * 10)
    assert not dp.HasField("noise_multiplier")  # unset: the builder calibrates it
    assert not config.federated_learning.HasField("evaluation")  # TRAINING_ONLY: none added

    spec = cfg.validate_text(minimal).spec
    assert spec.dp is not None and spec.dp.noise_multiplier is None and spec.dp.is_adaptive
    assert spec.max_aggregation_size == 13
    assert spec.max_training_batches_per_client == 0


def test_normalize_keeps_explicit_values_and_is_idempotent() -> None:
    text = VALID.replace("num_max_training_rounds: 100", "num_max_training_rounds: 100\n    population_size: 1000\n    dp_delta: 0.0001")
    config = cfg.parse_task_config(text)
    once = cfg.normalize(config)
    assert cfg.normalize(once) == once
    assert once.policies.model_release_policy.dp_delta == 0.0001
    assert once.federated_learning.learning_process.client_learning_rate == 0.01
    assert config != once  # the input is not modified
    assert not config.policies.HasField("dataset_policy")


def test_delta_defaults_to_one_over_population_size() -> None:
    text = VALID.replace("num_max_training_rounds: 100", "num_max_training_rounds: 100\n    population_size: 4000")
    assert cfg.validate_text(text).spec.delta == pytest.approx(1 / 4000)


def test_explicit_zero_differs_from_unset() -> None:
    unset = cfg.validate_text(VALID.replace("client_learning_rate: 0.01\n", "")).spec
    assert unset.client_learning_rate == cfg.DEFAULT_CLIENT_LEARNING_RATE
    over_zero = cfg.validate_text(VALID.replace("report_goal: 50", "report_goal: 50\n      over_selection_rate: 0")).spec
    assert over_zero.over_selection_rate == 0.0 and over_zero.max_aggregation_size == 50


def test_to_text_and_to_json_round_trip() -> None:
    config = cfg.load_task_config(CONFIGS / "fcp_server_config.pbtxt")
    normalized = cfg.normalize(config)
    assert cfg.parse_task_config(cfg.to_text(config)) == normalized
    assert cfg.parse_task_config(cfg.to_json(config)) == normalized
    assert json.loads(cfg.to_json(config))["federated_learning"]["learning_process"]["server_optimizer"] == "ADAM"
    assert cfg.to_text(config, normalized=False).count("\n") < cfg.to_text(config).count("\n")


@pytest.mark.parametrize(
    "text, expected",
    [("every_1_round", ("round", 1)), ("every_24_hour", ("hour", 24)), ("every_0_round", None),
     ("every_k_round", None), ("every_2_rounds", None), ("", None)],
)
def test_checkpoint_selector_parsing(text: str, expected: tuple[str, int] | None) -> None:
    selector = cfg.parse_checkpoint_selector(text)
    assert (None if selector is None else (selector.kind, selector.k)) == expected
    if selector is not None:
        assert selector.text == text


def test_max_aggregation_size_survives_float_rounding() -> None:
    assert cfg.max_aggregation_size(10, 0.1) == 11
    assert cfg.max_aggregation_size(2000, 0.3) == 2600
    assert cfg.max_aggregation_size(7, 0.0) == 7
    assert not math.isnan(cfg.max_aggregation_size(1, 1.0))


def test_load_missing_file_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        cfg.load_task_config(ROOT / "no" / "such.pbtxt")


# ------------------------------------------------------------------ CLI and import weight


def _cli() -> list[str]:
    # The full CLI imports every command group; until fedcompute.cli.stack_cmd exists,
    # run the config group through its own entry point (same handler, same exit codes).
    if importlib.util.find_spec("fedcompute.cli.stack_cmd") is not None:
        return [PYTHON, "-m", "fedcompute.cli.main", "config"]
    return [PYTHON, "-m", "fedcompute.cli.config_cmd"]


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_cli(), *args], capture_output=True, text=True, input=stdin, timeout=60, cwd=ROOT)


def test_cli_validate_ok_prints_normalized_config() -> None:
    result = _run("validate", str(CONFIGS / "fcp_server_config.pbtxt"))
    assert result.returncode == 0, result.stderr
    printed = cfg.parse_task_config(result.stdout)
    assert printed == cfg.normalize(cfg.load_task_config(CONFIGS / "fcp_server_config.pbtxt"))
    assert "server_learning_rate: 1.0" in result.stdout
    as_json = _run("validate", "--format", "json", str(CONFIGS / "dict_model_task_config.pbtxt"))
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout)["label_name"] == "my_label"


def test_cli_validate_seed_typo_exits_2_with_line_and_suggestion() -> None:
    path = CONFIGS / "seed_step3_fcp_server_config.pbtxt"
    result = _run("validate", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"{path}:47:7" in result.stderr
    assert 'did you mean "server_learning_rate"' in result.stderr


def test_cli_validate_prints_every_error_one_per_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pbtxt"
    bad.write_text(VALID.replace("report_goal: 50", "report_goal: 0").replace("clip_norm: 0.1", "clip_norm: -1")
                   .replace('name: "binary_accuracy"', 'name: "recal"'))
    result = _run("validate", str(bad))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2
    assert any(f"{bad}:{line_of(bad.read_text(), 'report_goal: 0')}: " in e and "fix: " in e for e in errors)
    assert any("differential_privacy.clip_norm" in e for e in errors)
    assert "2 errors in" in result.stderr


def test_cli_warnings_go_to_stderr_and_stdin_works() -> None:
    text = VALID.replace('name: "binary_accuracy"', 'name: "recal"')
    result = _run("validate", "-", stdin=text)
    assert result.returncode == 0
    assert 'warning: <stdin>:' in result.stderr and 'did you mean "recall"' in result.stderr
    assert "warning" not in result.stdout


def test_cli_missing_file_exits_2() -> None:
    result = _run("validate", "/nonexistent/config.pbtxt")
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_config_package_does_not_import_tensorflow() -> None:
    code = (
        "import sys, fedcompute.config, fedcompute.cli.config_cmd, fedcompute.proto.task_builder_pb2\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_federated', 'keras', 'jax'))\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_config_group_plugs_into_the_main_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # In-process through fedcompute.cli.main's own parser (only the config group loaded).
    from fedcompute.cli import main as cli_main

    monkeypatch.setattr(cli_main, "COMMAND_MODULES", ("fedcompute.cli.config_cmd",))
    assert cli_main.main(["config", "validate", str(CONFIGS / "tree_dp_task_config.pbtxt")]) == 0
    assert "type: TREE_AGGREGATION" in capsys.readouterr().out
    assert cli_main.main(["config", "validate", str(CONFIGS / "seed_step3_fcp_server_config.pbtxt")]) == 2
    assert 'did you mean "server_learning_rate"' in capsys.readouterr().err
    assert cli_main.main(["config"]) == 2
