"""The packaged Cloud Functions install from their pinned requirements and import.

Each light function's folder (``python -m fedcompute.deploy.package``) is installed into a
clean virtualenv with ``uv pip install -r requirements.txt`` (warm uv cache) and its
``main.py`` is imported by that venv's Python, from inside the folder, as the Cloud
Functions runtime does. The heavy functions are not installed (TensorFlow is ~500 MB):
their pins are checked against the lock instead.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
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
    assert sorted(package.FUNCTIONS) == folders, "add the new function to fedcompute.deploy.package.FUNCTIONS"
    for name in folders:
        folder = packaged / name
        assert (folder / "main.py").read_bytes() == (ROOT / "functions" / name / "main.py").read_bytes()
        assert (folder / "fedcompute" / "__init__.py").is_file()
        assert not list(folder.rglob("__pycache__")) and not list(folder.rglob("*.pyc"))
        assert (packaged / f"{name}.zip").is_file()


def test_pins_come_from_the_lock(packaged: Path) -> None:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    locked = {package.normalize(p["name"]): p.get("version") for p in lock["package"]}
    for name in package.FUNCTIONS:
        lines = [line for line in (packaged / name / "requirements.txt").read_text().splitlines()
                 if line and not line.startswith("#")]
        assert lines == sorted(lines, key=lambda line: line.split("==")[0]), f"{name}: requirements are not sorted"
        for line in lines:
            dist, _, version = line.partition("==")
            assert locked.get(dist) == version, f"{name}: {line} is not the locked version"
        dists = {line.split("==")[0] for line in lines}
        assert "functions-framework" in dists and "protobuf" in dists and "fedcompute" not in dists
        if name in HEAVY:
            assert {"tensorflow", "tensorflow-privacy", "dp-accounting", "numpy"} <= dists, name
            # Nothing the functions run imports tensorflow_federated.
            assert "tensorflow-federated" not in dists, name
        else:
            assert not dists & set(TENSORFLOW_FAMILY), f"light function {name} pins {dists & set(TENSORFLOW_FAMILY)}"


@pytest.mark.parametrize("function", LIGHT)
def test_light_function_installs_in_a_clean_venv_and_imports(function: str, packaged: Path, uv: str,
                                                            tmp_path: Path) -> None:
    folder = packaged / function
    venv = tmp_path / "venv"
    env = _clean_env()
    run = subprocess.run([uv, "venv", "--python", sys.executable, "--quiet", str(venv)], capture_output=True,
                         text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    python = venv / "bin" / "python"
    run = subprocess.run([uv, "pip", "install", "--quiet", "--python", str(python), "-r", "requirements.txt"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=folder)
    assert run.returncode == 0, f"{function}: pip install -r requirements.txt failed:\n{run.stderr[-3000:]}"
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
