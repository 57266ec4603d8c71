"""Package each Cloud Function as a self-contained source folder and a reproducible zip.

``python -m fedcompute.deploy.package --out build/functions [--function NAME]`` writes, per
function, ``<out>/<name>/`` with

* ``main.py`` (copied from ``functions/<name>/main.py``),
* ``fedcompute/`` (the library source, without tests or caches),
* ``requirements.txt``: the function's locked dependency set, written by ``uv export``:

  - light functions (no TensorFlow: assignment, ingestion, management, scheduler,
    dashboard) from their own uv project ``functions/light`` (``uv.lock`` there; Python
    3.12, current Google Cloud clients, protobuf >= 5, grpcio >= 1.83), runtime ``python312``;
  - heavy functions (task_builder, aggregator) from the root ``uv.lock``, dependency group
    ``heavy-functions`` (TensorFlow 2.14, protobuf 4.25, no tensorflow-federated), runtime
    ``python311``;

and ``<out>/<name>.zip`` with fixed timestamps and permissions, so the same sources give
byte-identical zips (Terraform re-deploys a function only when its zip's hash changes).
The committed ``*_pb2.py`` (protobuf 4.25 gencode) load under both protobuf lines.
Which functions exist and which are heavy comes from ``fedcompute.catalogue``; ``make package``
also rewrites Terraform's copy of it (``python -m fedcompute.deploy.catalogue --write``).
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedcompute.catalogue import FUNCTIONS, FunctionSpec
from fedcompute.errors import ConfigError

LIGHT_PROJECT = Path("functions") / "light"
HEAVY_GROUP = "heavy-functions"


def export_arguments(spec: FunctionSpec, root: Path) -> list[str]:
    """``uv export`` arguments selecting the function's lock (and group)."""
    if spec.heavy:
        return ["--project", str(root), "--only-group", HEAVY_GROUP]
    return ["--project", str(root / LIGHT_PROJECT)]


# Copied sources leave these out.
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "tests", "test_*.py", ".pytest_cache",
                                  ".mypy_cache", "*.so.tmp")
ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)


def normalize(name: str) -> str:
    """PEP 503 normalized distribution name (``Foo_Bar`` -> ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def uv_command() -> list[str]:
    """How to run uv here: ``uv`` on PATH, else ``python -m uv``.

    Raises:
        ConfigError: uv is not installed.
    """
    found = shutil.which("uv")
    if found:
        return [found]
    probe = subprocess.run([sys.executable, "-m", "uv", "--version"], capture_output=True, text=True)
    if probe.returncode == 0:
        return [sys.executable, "-m", "uv"]
    raise ConfigError("uv is not installed: packaging exports each function's lock with `uv export`",
                      hint="`python3 -m pip install uv` (or `make uv`)")


def export_requirements(spec: FunctionSpec, root: Path) -> str:
    """The function's ``requirements.txt`` (exact pins with environment markers) from its lock.

    Raises:
        ConfigError: ``uv export`` failed (e.g. the lock is out of date with its pyproject).
    """
    command = [*uv_command(), "export", "--frozen", "--no-hashes", "--no-emit-project", "--no-header",
               "--no-annotate", *export_arguments(spec, root)]
    run = subprocess.run(command, capture_output=True, text=True, cwd=root, timeout=300)
    if run.returncode != 0:
        lock = "uv.lock" if spec.heavy else f"{LIGHT_PROJECT}/uv.lock"
        raise ConfigError(f"`uv export` failed for {spec.name}: {run.stderr.strip()[-800:]}", location=lock,
                          hint="re-lock with `uv lock`" + ("" if spec.heavy else f" --project {LIGHT_PROJECT}"))
    header = (f"fedcompute Cloud Function {spec.name} (runtime {spec.runtime}): exported from "
              f"{'uv.lock, group ' + HEAVY_GROUP if spec.heavy else LIGHT_PROJECT.as_posix() + '/uv.lock'} "
              "by fedcompute.deploy.package. Do not edit: run `make package`.")
    return f"# {header}\n{run.stdout}"


def parse_pins(requirements: str) -> dict[str, str]:
    """``name -> version`` of the ``name==version`` lines of a requirements text."""
    pins: dict[str, str] = {}
    for line in requirements.splitlines():
        spec = line.split(";", 1)[0].strip()
        if spec and not spec.startswith("#") and "==" in spec:
            name, _, version = spec.partition("==")
            pins[normalize(name)] = version.strip()
    return pins


def deterministic_zip(source: Path, target: Path) -> None:
    """Zip ``source``'s files (sorted, fixed timestamps and modes): same files, same bytes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in source.rglob("*") if p.is_file())
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for path in files:
            info = zipfile.ZipInfo(path.relative_to(source).as_posix(), date_time=ZIP_TIMESTAMP)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            info.create_system = 3  # unix, whatever the build machine
            archive.writestr(info, path.read_bytes(), compresslevel=9)


@dataclass(frozen=True)
class PackageResult:
    """What :func:`package_function` wrote."""

    name: str
    folder: Path
    zip_path: Path
    pins: Mapping[str, str]


def repo_root() -> Path:
    """The repository root (``shared/fedcompute/deploy`` -> up three levels)."""
    return Path(__file__).resolve().parents[3]


def package_function(name: str, out: Path, *, root: Path | None = None) -> PackageResult:
    """Write ``out/<name>/`` and ``out/<name>.zip`` for one function (replacing old output).

    Raises:
        ConfigError: unknown function, missing ``functions/<name>/main.py`` or ``uv export`` problems.
    """
    root = root or repo_root()
    spec = FUNCTIONS.get(name)
    if spec is None:
        raise ConfigError(f"unknown function {name!r}", hint=f"choose one of {', '.join(sorted(FUNCTIONS))}")
    entry = root / "functions" / name / "main.py"
    if not entry.is_file():
        raise ConfigError(f"{entry} does not exist", hint="run from a fedcompute checkout")
    requirements = export_requirements(spec, root)
    pins = parse_pins(requirements)
    folder = out / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shutil.copyfile(entry, folder / "main.py")
    shutil.copytree(root / "shared" / "fedcompute", folder / "fedcompute", ignore=_IGNORED)
    (folder / "requirements.txt").write_text(requirements)
    zip_path = out / f"{name}.zip"
    deterministic_zip(folder, zip_path)
    return PackageResult(name, folder, zip_path, pins)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: package every function (or one) into ``--out``. Exit 2 on bad input."""
    parser = argparse.ArgumentParser(prog="python -m fedcompute.deploy.package",
                                     description="Package the Cloud Functions for Terraform (infra/).")
    parser.add_argument("--out", default="build/functions", help="output folder (default build/functions)")
    parser.add_argument("--function", action="append", choices=sorted(FUNCTIONS),
                        help="package only this function (repeatable; default all)")
    parser.add_argument("--root", default=None, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve() if args.root else repo_root()
    out = Path(args.out)
    try:
        for name in args.function or sorted(FUNCTIONS):
            result = package_function(name, out, root=root)
            print(f"{name}: {result.zip_path} ({result.zip_path.stat().st_size // 1024} KiB, "
                  f"{len(result.pins)} pinned distributions, runtime {FUNCTIONS[name].runtime})")
    except (ConfigError, OSError, subprocess.TimeoutExpired) as error:
        print(f"error: {error}", file=sys.stderr)
        hint = getattr(error, "hint", None)
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
