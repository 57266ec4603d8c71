"""The model sandbox (issue 13, High 1): the child's environment holds no secrets, its limits
stop it, and what comes back is re-raised as the builder's own error types, sanitized."""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedcompute.errors import ArtifactBuildError
from fedcompute.taskbuilder import sandbox
from fedcompute.taskbuilder.flex_ops import UnsupportedOpsError
from fedcompute.taskbuilder.model_check import ModelCheckError
from fedcompute.taskbuilder.op_allowlist import DisallowedOpError

SECRETS = {
    "FEDCOMPUTE_API_KEY": "k", "GOOGLE_APPLICATION_CREDENTIALS": "/creds.json", "GOOGLE_CLOUD_PROJECT": "p",
    "FIRESTORE_EMULATOR_HOST": "127.0.0.1:1", "STORAGE_EMULATOR_HOST": "http://127.0.0.1:2",
    "PUBSUB_EMULATOR_HOST": "127.0.0.1:3", "AWS_SECRET_ACCESS_KEY": "a", "HTTPS_PROXY": "http://proxy",
    "FEDCOMPUTE_TASK_MANAGEMENT_URL": "http://127.0.0.1:4", "HOME": "/root", "TMPDIR": "/tmp",
}


def test_the_child_environment_is_an_allow_list(tmp_path: Path) -> None:
    env = sandbox.sandbox_environment({**SECRETS, "PATH": "/usr/bin", "LANG": "C.UTF-8"}, tmp_path)
    assert sorted((set(SECRETS) - {"HOME", "TMPDIR"}) & set(env)) == []
    assert (env["HOME"], env["TMPDIR"]) == (str(tmp_path / "home"), str(tmp_path / "tmp"))
    assert env["PATH"] == "/usr/bin" and env["LANG"] == "C.UTF-8"


def test_the_cpu_limit_stops_the_child(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "saved_model.pb").write_bytes(b"")
    job = sandbox.ModelJob(model_dir=str(tmp_path / "model"), label_name=None)
    with pytest.raises(ArtifactBuildError, match=r"stopped by its CPU time limit \(1 s\)"):
        sandbox.inspect_model(job, tmp_path / "job", limits=sandbox.SandboxLimits(cpu_seconds=1))


def test_a_child_error_comes_back_as_the_same_error_type(tmp_path: Path) -> None:
    job = sandbox.ModelJob(model_dir=str(tmp_path / "missing"), label_name=None)
    with pytest.raises(ModelCheckError, match="does not exist"):
        sandbox.inspect_model(job, tmp_path / "job")


@pytest.mark.parametrize("record, error_type, text", [
    ({"kind": "DisallowedOpError", "message": "uses ReadFile", "hint": "h"}, DisallowedOpError, "uses ReadFile (h)"),
    ({"kind": "UnsupportedOpsError", "unsupported": {"L2Loss": "L2LossOp"}}, UnsupportedOpsError, "'L2Loss'"),
    ({"kind": "SomethingElse", "message": "x" * 5000}, ArtifactBuildError, "x" * sandbox.MAX_ERROR_CHARS),
])
def test_error_records_map_to_a_fixed_set_of_types_and_are_truncated(record: dict, error_type: type,
                                                                     text: str) -> None:
    with pytest.raises(error_type) as raised:
        sandbox._raise_child_error(json.loads(json.dumps(record)))
    assert text in str(raised.value)
    assert len(str(raised.value)) <= 2 * sandbox.MAX_ERROR_CHARS + 10


def test_an_unexpected_child_exception_is_reported_without_its_text() -> None:
    record = sandbox._error_record(ValueError("could not convert string: TOPSECRET"))
    assert record["kind"] == "unexpected"
    assert "TOPSECRET" not in json.dumps(record)


def _facts_with_tflite() -> sandbox.ModelFacts:
    import numpy as np

    flex = sandbox.FlexOutcome(
        "0", "0", b"train-model", b"eval-model", training_ops=("FlexAddV2",), eval_ops=(),
        training_io=((("x", (-1, 2), "float32"), ("trainable_0", (2, 1), "float32")),
                     (("loss", (), "float32"),)),
        eval_io=((("serialized_examples", (-1,), "string"),), (("accuracy", (), "float32"),)))
    return sandbox.ModelFacts(input_type=1, label_name="y", example_spec={}, input_spec={}, num_parameters=2,
                              trainable=(np.ones((2, 1), np.float32),), non_trainable=(), flex=flex)


def test_the_tflite_steps_cross_the_process_boundary_as_plain_data(tmp_path: Path) -> None:
    sandbox._write_result(tmp_path, _facts_with_tflite())
    assert not list(tmp_path.glob("*.pkl"))
    facts = sandbox._read_result(tmp_path)
    assert facts.flex is not None
    step = facts.flex.plan_step("TRAINING")
    assert step.model == b"train-model" and step.flex_ops == ("FlexAddV2",)
    assert [tuple(s) for s in step.inputs] == [("x", (-1, 2), "float32"), ("trainable_0", (2, 1), "float32")]
    evaluation = facts.flex.plan_step("EVALUATION")
    assert [tuple(s) for s in evaluation.inputs] == [("serialized_examples", (-1,), "string")]
    assert [s.name for s in evaluation.outputs] == ["accuracy"]


@pytest.mark.parametrize("bad_io", [
    [[["x", [-1, 2], "float32"]]],  # not (inputs, outputs)
    [[["x", ["2"], "float32"]], []],  # a shape that is not ints
    [[["x", [2], "Not a dtype"]], []],
    [[["x" * 1000, [2], "float32"]], []],
    [[["x", [2], "float32", "extra"]], []],
])
def test_a_malformed_signature_from_the_child_fails_the_build(tmp_path: Path, bad_io: list) -> None:
    sandbox._write_result(tmp_path, _facts_with_tflite())
    meta = json.loads((tmp_path / "result.json").read_text())
    meta["flex"]["training_io"] = bad_io
    (tmp_path / "result.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactBuildError, match="malformed training signature"):
        sandbox._read_result(tmp_path)


# --------------------------------------------------------------------------- confinement (real child)

PROBE = '''
import json, socket, sys
from pathlib import Path
from fedcompute.taskbuilder import sandbox

record = sandbox.confine(sandbox.RunAs.parse(sys.argv[3]))
outcome = {"confinement": record}
try:
    Path(sys.argv[4], "planted").write_text("x")
    outcome["write"] = "written"
except OSError as error:
    outcome["write"] = type(error).__name__
try:
    outcome["read"] = Path(sys.argv[5]).read_text()
except OSError as error:
    outcome["read"] = type(error).__name__
try:
    with socket.socket() as client:
        client.settimeout(2)
        client.connect(("127.0.0.1", int(sys.argv[6])))
    outcome["socket"] = "connected"
except OSError as error:
    outcome["socket"] = type(error).__name__
Path("probe.json").write_text(json.dumps(outcome))
'''


def _code_reachable_by(run_as: sandbox.RunAs) -> bool:
    return all(sandbox._reachable_by(path, run_as) for path in sandbox._installed_code())


def test_a_sandbox_user_that_cannot_reach_the_installation_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    private = tmp_path / "private"
    (private / "site-packages").mkdir(parents=True)
    private.chmod(0o700)
    reachable = Path(tempfile.mkdtemp(prefix="fedcompute-sandbox-test-"))
    try:
        reachable.chmod(0o711)
        for sub in ("home", "tmp", "out"):
            (reachable / "job" / sub).mkdir(parents=True)
        (reachable / "model").mkdir()
        monkeypatch.setattr(sandbox, "_installed_code", lambda: [private / "site-packages" / "fedcompute"])
        nobody = sandbox.RunAs(65534, 65534)
        with caplog.at_level("WARNING", logger=sandbox.log.name):
            assert sandbox._hand_over(reachable / "job", reachable / "model", nobody) is None
        assert "cannot reach the Python installation" in caplog.text
        assert (reachable / "job" / "home").stat().st_uid == os.getuid()  # nothing handed over
    finally:
        shutil.rmtree(reachable, ignore_errors=True)


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory the sandbox user can traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="fedcompute-sandbox-test-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="the privilege drop applies to a builder running as root")
def test_a_confined_child_cannot_write_root_files_read_secrets_or_open_sockets(reachable_dir: Path) -> None:
    root_owned = reachable_dir / "root-owned"
    root_owned.mkdir(mode=0o755)
    secret = reachable_dir / "secret"
    secret.write_text("TOPSECRET")
    secret.chmod(0o600)
    job = reachable_dir / "job"
    for sub in ("", "home", "tmp", "out"):
        (job / sub).mkdir(exist_ok=True)
    (job / "probe.py").write_text(PROBE)
    run_as = sandbox.sandbox_user({})
    assert run_as is not None and run_as.uid != 0
    if not _code_reachable_by(run_as):
        # A checkout under a 0700 directory (e.g. /root): the child could not import after the
        # drop, so the builder keeps its own user and says why.
        assert sandbox._hand_over(job, reachable_dir / "root-owned", run_as) is None
        return
    assert sandbox._hand_over(job, reachable_dir / "root-owned", run_as) == run_as
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        done = sandbox.spawn_child("probe", job, ["--run-as", run_as.arg(), str(root_owned), str(secret),
                                                  str(listener.getsockname()[1])], sandbox.SandboxLimits())
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        with pytest.raises(TimeoutError):
            listener.accept()
    outcome = json.loads((job / "probe.json").read_text())
    assert outcome["confinement"]["uid"] == run_as.uid
    assert outcome["write"] == "PermissionError" and not (root_owned / "planted").exists()
    assert outcome["read"] == "PermissionError"
    assert outcome["socket"] != "connected"
    if outcome["confinement"]["network"] == "isolated":
        assert outcome["socket"] == "OSError"  # ENETUNREACH: the namespace has no interface up


def test_a_real_model_check_runs_confined_and_still_reads_the_model(reachable_dir: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    from fedcompute.models.example_models import save_example_models

    model_dir = save_example_models(reachable_dir / "models", ["fashion_logreg_type1"], seed=1)["fashion_logreg_type1"]
    with caplog.at_level("INFO", logger=sandbox.log.name):
        facts = sandbox.inspect_model(sandbox.ModelJob(model_dir=str(model_dir), label_name=None, flex_ops_check=False),
                                      reachable_dir / "job")
    assert facts.num_parameters == sum(w.size for w in facts.trainable) > 0
    confinement = json.loads((reachable_dir / "job" / "confinement.json").read_text())
    run_as = sandbox.sandbox_user({})
    if run_as is not None and _code_reachable_by(run_as):
        assert confinement["uid"] == run_as.uid
        assert (reachable_dir / "job" / "home").stat().st_uid == confinement["uid"]
    elif run_as is not None:  # the installation is not reachable by the sandbox user: said, not hidden
        assert confinement["uid"] == os.getuid()
        assert "cannot reach the Python installation" in caplog.text
    else:
        assert confinement["uid"] == os.getuid()
    assert f"model sandbox ran as uid {confinement['uid']}" in caplog.text


def test_a_root_sandbox_user_is_refused() -> None:
    if os.geteuid() != 0:
        assert sandbox.sandbox_user({sandbox.SANDBOX_USER_ENV: "root"}) is None  # not root: same user
        return
    with pytest.raises(ArtifactBuildError, match="is root"):
        sandbox.sandbox_user({sandbox.SANDBOX_USER_ENV: "root"})
    with pytest.raises(ArtifactBuildError, match="no such user"):
        sandbox.sandbox_user({sandbox.SANDBOX_USER_ENV: "no-such-user-xyz"})
