"""The packaged Cloud Functions install from their own locks and serve requests.

The light functions' requirements (``uv export`` of ``functions/light/uv.lock``; they are
identical) are installed once into a clean Python 3.12/3.13 virtualenv with
``uv pip install -r requirements.txt`` (warm uv cache); each function's ``main.py`` is
imported there, from inside its folder, as the Cloud Functions runtime does, with
FutureWarnings as errors, and served by functions-framework for one request. The heavy
functions are not installed (TensorFlow is ~500 MB): their pins are checked against the lock.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from fedcompute.deploy import package

ROOT = Path(__file__).resolve().parents[2]
LIGHT = sorted(name for name, spec in package.FUNCTIONS.items() if not spec.heavy)
HEAVY = sorted(name for name, spec in package.FUNCTIONS.items() if spec.heavy)
TENSORFLOW_FAMILY = ("tensorflow", "tensorflow-privacy", "tensorflow-federated", "tensorflow-estimator", "keras",
                     "jax", "jaxlib", "dp-accounting", "scipy")
# Modules a function imports lazily at run time (not at `import main`), checked too.
CLOUDEVENT = {"result_ingestion", "scheduler"}
RUNTIME_MODULES = {
    "result_ingestion": ["fedcompute.learning.tensor_codec"],
}
CLIENT_MODULES = ["google.cloud.storage", "google.cloud.pubsub_v1", "google.cloud.firestore",
                  "google.cloud.firestore_v1.base_query", "google.api_core.exceptions", "google.auth.credentials",
                  "fedcompute.adapters.clients"]

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def packaged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("functions")
    run = subprocess.run([sys.executable, "-m", "fedcompute.deploy.package", "--out", str(out)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    return out


@pytest.fixture(scope="module")
def uv() -> str:
    found = shutil.which("uv")
    if found is None:
        pytest.fail("uv is not on PATH: install it (`python3 -m pip install uv`) to run the packaging test")
    return found


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FEDCOMPUTE_", "VIRTUAL_ENV", "PYTHON", "UV_PROJECT"))
           and not k.endswith("_EMULATOR_HOST")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def test_every_function_folder_is_packaged(packaged: Path) -> None:
    folders = sorted(p.parent.name for p in (ROOT / "functions").glob("*/main.py"))
    assert sorted(package.FUNCTIONS) == folders, "add the new function to fedcompute.catalogue.FUNCTIONS"
    for name in folders:
        folder = packaged / name
        assert (folder / "main.py").read_bytes() == (ROOT / "functions" / name / "main.py").read_bytes()
        assert (folder / "fedcompute" / "__init__.py").is_file()
        assert not list(folder.rglob("__pycache__")) and not list(folder.rglob("*.pyc"))
        assert (packaged / f"{name}.zip").is_file()


def _locked_versions(lock_path: Path) -> dict[str, str]:
    lock = tomllib.loads(lock_path.read_text())
    return {package.normalize(p["name"]): p.get("version") for p in lock["package"]}


def _pins(packaged: Path, name: str) -> dict[str, str]:
    return package.parse_pins((packaged / name / "requirements.txt").read_text())


def test_pins_come_from_each_functions_own_lock(packaged: Path) -> None:
    light_lock = _locked_versions(ROOT / package.LIGHT_PROJECT / "uv.lock")
    heavy_lock = _locked_versions(ROOT / "uv.lock")
    for name, spec in package.FUNCTIONS.items():
        pins = _pins(packaged, name)
        locked = heavy_lock if spec.heavy else light_lock
        assert {dist: locked.get(dist) for dist in pins} == pins, f"{name}: a pin is not the locked version"
        assert "functions-framework" in pins and "protobuf" in pins and "fedcompute" not in pins
        if spec.heavy:
            assert spec.runtime == "python311"
            assert {"tensorflow", "tensorflow-privacy", "dp-accounting", "numpy"} <= set(pins), name
            assert pins["protobuf"].startswith("4.25."), name  # TensorFlow 2.14's protobuf line
            # Nothing the functions run imports tensorflow_federated.
            assert "tensorflow-federated" not in pins, name
        else:
            assert spec.runtime == "python312"
            heavy = set(pins) & set(TENSORFLOW_FAMILY)
            assert not heavy, f"light function {name} pins {heavy}"
            assert _version(pins["protobuf"]) >= (5,) and _version(pins["grpcio"]) >= (1, 83), pins
            # Device signatures (Ed25519) and HPKE-sealed uploads: fedcompute.identity, fedcompute.crypto.hpke.
            assert _version(pins["cryptography"]) >= (50,), name


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def _python_312_or_313() -> str:
    """An installed CPython 3.12 or 3.13 (uv's, on PATH, or pyenv's); the test fails without one."""
    candidates: list[str] = []
    for version in ("3.12", "3.13"):
        run = subprocess.run([*package.uv_command(), "python", "find", "--no-python-downloads", version],
                             capture_output=True, text=True, timeout=60)
        candidates += [run.stdout.strip()] if run.returncode == 0 else []
        candidates += [found] if (found := shutil.which(f"python{version}")) else []
    pyenv = shutil.which("pyenv")
    if pyenv:
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True, timeout=30).stdout.strip()
        candidates += sorted(str(p) for p in Path(root).glob("versions/3.1[23].*/bin/python3.1[23]"))
    for candidate in candidates:
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] in ((3, 12), (3, 13)))"],
                               capture_output=True, text=True, timeout=60)
        if probe.stdout.strip() == "True":
            return candidate
    pytest.fail("no Python 3.12 or 3.13 found: install one (`uv python install 3.12`) for the light functions")


@pytest.fixture(scope="module")
def light_venv(packaged: Path, uv: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Python 3.12/3.13 venv with the light functions' requirements (they are identical)."""
    requirements = {name: (packaged / name / "requirements.txt").read_text().split("\n", 1)[1] for name in LIGHT}
    assert len(set(requirements.values())) == 1, "the light functions' requirements differ: one venv per set"
    venv = tmp_path_factory.mktemp("light") / "venv"
    env = _clean_env()
    run = subprocess.run([uv, "venv", "--python", _python_312_or_313(), "--quiet", str(venv)], capture_output=True,
                         text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    python = venv / "bin" / "python"
    run = subprocess.run([uv, "pip", "install", "--quiet", "--python", str(python), "-r", "requirements.txt"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=packaged / LIGHT[0])
    assert run.returncode == 0, f"pip install -r requirements.txt failed:\n{run.stderr[-3000:]}"
    return venv


def test_light_functions_serve_a_request_on_python_312_with_protobuf_5(light_venv: Path, packaged: Path,
                                                                      tmp_path: Path) -> None:
    import requests

    from fedcompute.stack.procs import free_port
    from fedcompute.web import health_event_headers

    python = light_venv / "bin" / "python"
    # The committed *_pb2.py (protobuf 4.25 gencode) load and round-trip under protobuf >= 5, warning-free.
    probe = ("import importlib, pkgutil, sys, google.protobuf, grpc, fedcompute.proto as p\n"
             "mods = [importlib.import_module('fedcompute.proto.' + m.name) for m in pkgutil.iter_modules(p.__path__)"
             " if m.name.endswith('_pb2')]\n"
             "t = importlib.import_module('fedcompute.proto.task_management_pb2').Task\n"
             "assert t.FromString(t(population_name='x', task_id=3).SerializeToString()).task_id == 3\n"
             "print(len(mods), '%d.%d' % sys.version_info[:2], google.protobuf.__version__, grpc.__version__)\n")
    versions = subprocess.run([str(python), "-W", "error", "-c", probe], capture_output=True, text=True, timeout=60,
                              cwd=packaged / LIGHT[0], env=_clean_env())
    assert versions.returncode == 0, versions.stderr[-3000:]
    count, python_version, protobuf_version, _ = versions.stdout.split()
    assert int(count) >= 5 and python_version in ("3.12", "3.13") and _version(protobuf_version) >= (5,)
    print(f"\nlight functions venv: pb2 modules, Python, protobuf, grpcio = {versions.stdout.strip()}")
    env = _clean_env()
    for function in LIGHT:
        port = free_port()
        log = tmp_path / f"{function}.log"
        with open(log, "wb") as out:
            server = subprocess.Popen(
                [str(light_venv / "bin" / "functions-framework"), "--source", "main.py", "--target", function,
                 "--signature-type", "cloudevent" if function in CLOUDEVENT else "http", "--host", "127.0.0.1",
                 "--port", str(port)],
                cwd=packaged / function, env={**env, "PYTHONWARNINGS": "error::FutureWarning"}, stdout=out,
                stderr=subprocess.STDOUT)
        try:
            answer = None
            for _ in range(300):
                try:
                    if function in CLOUDEVENT:
                        answer = requests.post(f"http://127.0.0.1:{port}/", data=b"{}", timeout=5,
                                               headers=health_event_headers(f"pkg-{function}"))
                    else:
                        answer = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
                    break
                except requests.ConnectionError:
                    assert server.poll() is None, f"{function} exited:\n{log.read_text()[-3000:]}"
                    time.sleep(0.1)
            assert answer is not None and answer.status_code == 200, (function, answer, log.read_text()[-3000:])
            if function not in CLOUDEVENT:
                assert answer.json()["function"] == function
        finally:
            server.terminate()
            server.wait(timeout=30)
        text = log.read_text()
        assert "FutureWarning" not in text and "Traceback" not in text, text[-3000:]
        lines = [line for line in text.splitlines() if line.strip()]
        assert all(line.startswith("{") for line in lines), lines  # JSON log lines only


@pytest.mark.parametrize("function", LIGHT)
def test_light_function_imports_without_tensorflow_or_future_warnings(function: str, packaged: Path,
                                                                     light_venv: Path, tmp_path: Path) -> None:
    folder = packaged / function
    env = {**_clean_env(), "PYTHONWARNINGS": "error::FutureWarning"}
    python = light_venv / "bin" / "python"
    modules = ["main", *CLIENT_MODULES, *RUNTIME_MODULES.get(function, [])]
    probe = ("import importlib, sys\n"
             f"for name in {modules!r}:\n"
             "    importlib.import_module(name)\n"
             "import main\n"
             f"assert callable(getattr(main, {function!r}))\n"
             "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_privacy', 'jax'))\n"
             "assert not heavy, heavy\n"
             "print('ok', main.NAME)\n")
    run = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=120, env=env,
                         cwd=folder)
    assert run.returncode == 0, f"{function}: import failed in the packaged folder:\n{run.stderr[-3000:]}"
    assert run.stdout.strip() == f"ok {function}"
    # The clean venv really is clean: the editable fedcompute of the project venv is not on its path.
    run = subprocess.run([str(python), "-c", "import fedcompute, sys; print(fedcompute.__file__)"],
                         capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert run.returncode != 0, f"the test venv sees fedcompute outside the package: {run.stdout}"
