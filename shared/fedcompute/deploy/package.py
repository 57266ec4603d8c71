"""Package each Cloud Function as a self-contained source folder and a reproducible zip.

``python -m fedcompute.deploy.package --out build/functions [--function NAME]`` writes, per
function, ``<out>/<name>/`` with

* ``main.py`` (copied from ``functions/<name>/main.py``),
* ``fedcompute/`` (the library source, without tests or caches),
* ``requirements.txt``: ``name==version`` pins, sorted, computed from ``uv.lock`` as the
  dependency closure of that function's root distributions (light functions never get
  TensorFlow),

and ``<out>/<name>.zip`` with fixed timestamps and permissions, so the same sources give
byte-identical zips (Terraform re-deploys a function only when its zip's hash changes).
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tomllib
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from fedcompute.errors import ConfigError

# What every function imports (functions_framework, flask, protobuf messages) and the
# clients it creates lazily (storage, pubsub, firestore; api_core and auth come with them).
_BASE = (
    "functions-framework",
    "flask",
    "protobuf",
    "google-api-core",
    "google-auth",
    "google-cloud-storage",
    "google-cloud-pubsub",
    "google-cloud-firestore",
)
# Heavy functions: TensorFlow graph building / DP aggregation. tensorflow-federated is not
# needed: the builder loads SavedModels with tf.saved_model and nothing on its code path
# imports tensorflow_federated (only the example-model helpers do, on the operator's side).
_TENSORFLOW = ("numpy", "scipy", "tensorflow", "tensorflow-privacy", "dp-accounting", "flatbuffers")


@dataclass(frozen=True)
class FunctionSpec:
    """One Cloud Function: its name (= folder = entry point) and its root distributions."""

    name: str
    roots: tuple[str, ...]
    heavy: bool = False


FUNCTIONS: dict[str, FunctionSpec] = {
    spec.name: spec
    for spec in (
        FunctionSpec("task_assignment", _BASE),
        FunctionSpec("task_management", _BASE),
        FunctionSpec("scheduler", _BASE),
        FunctionSpec("dashboard", _BASE),  # read-only monitoring page: Firestore + metrics JSON
        # The upload validator decodes updates with numpy (fedcompute.learning.tensor_codec).
        FunctionSpec("result_ingestion", _BASE + ("numpy",)),
        FunctionSpec("task_builder", _BASE + ("requests",) + _TENSORFLOW, heavy=True),
        FunctionSpec("aggregator", _BASE + _TENSORFLOW, heavy=True),
    )
}

# The Cloud Functions python311 runtime (Ubuntu 22.04, x86_64, CPython 3.11): the
# environment dependency markers in the lock are evaluated against.
TARGET_ENVIRONMENT: dict[str, str] = {
    "implementation_name": "cpython",
    "implementation_version": "3.11.9",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_release": "",
    "platform_system": "Linux",
    "platform_version": "",
    "python_full_version": "3.11.9",
    "python_version": "3.11",
    "sys_platform": "linux",
    "extra": "",
}

# Copied sources leave these out.
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "tests", "test_*.py", ".pytest_cache",
                                  ".mypy_cache", "*.so.tmp")
ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)


def normalize(name: str) -> str:
    """PEP 503 normalized distribution name (``Foo_Bar`` -> ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Requirement:
    """One dependency edge of the lock: a name, the extras asked for, an optional marker."""

    name: str
    extras: tuple[str, ...] = ()
    marker: str | None = None


@dataclass(frozen=True)
class LockedPackage:
    """One ``[[package]]`` of ``uv.lock``."""

    name: str
    version: str
    dependencies: tuple[Requirement, ...] = ()
    optional: Mapping[str, tuple[Requirement, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Lock:
    """The parsed lock: packages by normalized name and the ``[manifest] overrides`` pins."""

    packages: Mapping[str, LockedPackage]
    overrides: Mapping[str, str]


def _requirements(entries: Iterable[Mapping[str, object]]) -> tuple[Requirement, ...]:
    return tuple(
        Requirement(normalize(str(e["name"])), tuple(str(x) for x in cast(Iterable[object], e.get("extra") or ())),
                    str(e["marker"]) if e.get("marker") else None)
        for e in entries
    )


def parse_lock(text: str) -> Lock:
    """Parse ``uv.lock`` text (TOML) into a :class:`Lock`.

    Raises:
        ConfigError: the text is not a uv lock file or a package is listed twice (a fork
            on markers, which this packager does not resolve).
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"uv.lock is not valid TOML: {error}", hint="regenerate it with `uv lock`") from error
    if "package" not in data:
        raise ConfigError("uv.lock has no [[package]] entries", hint="regenerate it with `uv lock`")
    packages: dict[str, LockedPackage] = {}
    for entry in data["package"]:
        name = normalize(entry["name"])
        if name in packages:
            raise ConfigError(f"uv.lock lists {name} more than once (a resolution fork)",
                              hint="pin the package to one version in pyproject.toml")
        optional = {extra: _requirements(reqs) for extra, reqs in entry.get("optional-dependencies", {}).items()}
        packages[name] = LockedPackage(name, str(entry.get("version", "")), _requirements(entry.get("dependencies", ())),
                                       optional)
    overrides: dict[str, str] = {}
    for item in data.get("manifest", {}).get("overrides", ()):
        spec = str(item.get("specifier", ""))
        if spec.startswith("=="):
            overrides[normalize(item["name"])] = spec[2:]
    return Lock(packages, overrides)


def _marker_applies(marker: str | None, environment: Mapping[str, str]) -> bool:
    if not marker:
        return True
    from packaging.markers import Marker  # tensorflow depends on packaging: always in the locked env

    return Marker(marker).evaluate(dict(environment))


def closure(lock: Lock, roots: Sequence[str], environment: Mapping[str, str] = TARGET_ENVIRONMENT) -> dict[str, str]:
    """Every distribution (``name -> version``) the roots need on the target, per the lock.

    Follows dependencies and requested extras, skipping edges whose marker is false on
    ``environment``. A ``[manifest] overrides`` ``==`` pin (jax, jaxlib) must agree with the
    locked version.

    Raises:
        ConfigError: a root or dependency is not in the lock, or disagrees with an override.
    """
    pins: dict[str, str] = {}
    seen: set[tuple[str, str | None]] = set()
    todo: list[tuple[str, str | None]] = [(normalize(r), None) for r in roots]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        package = lock.packages.get(name)
        if package is None:
            raise ConfigError(f"{name} is not in uv.lock", location="uv.lock",
                              hint="add it to pyproject.toml and run `uv lock`, or fix the function's root list")
        if name in lock.overrides and lock.overrides[name] != package.version:
            raise ConfigError(f"uv.lock has {name} {package.version} but the override pins {lock.overrides[name]}",
                              location="uv.lock", hint="run `uv lock` to apply [tool.uv] override-dependencies")
        pins[name] = lock.overrides.get(name, package.version)
        edges = package.dependencies if extra is None else package.optional.get(extra, ())
        for requirement in edges:
            if not _marker_applies(requirement.marker, environment):
                continue
            todo.append((requirement.name, None))
            todo.extend((requirement.name, x) for x in requirement.extras)
    return pins


def requirements_text(pins: Mapping[str, str], *, header: str = "") -> str:
    """``name==version`` lines, sorted by name (deterministic)."""
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    lines += [f"{name}=={version}" for name, version in sorted(pins.items())]
    return "\n".join(lines) + "\n"


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


def package_function(name: str, out: Path, *, root: Path | None = None, lock: Lock | None = None) -> PackageResult:
    """Write ``out/<name>/`` and ``out/<name>.zip`` for one function (replacing old output).

    Raises:
        ConfigError: unknown function, missing ``functions/<name>/main.py`` or lock problems.
    """
    root = root or repo_root()
    spec = FUNCTIONS.get(name)
    if spec is None:
        raise ConfigError(f"unknown function {name!r}", hint=f"choose one of {', '.join(sorted(FUNCTIONS))}")
    entry = root / "functions" / name / "main.py"
    if not entry.is_file():
        raise ConfigError(f"{entry} does not exist", hint="run from a fedcompute checkout")
    lock = lock or parse_lock((root / "uv.lock").read_text())
    pins = closure(lock, spec.roots)
    pins.pop("fedcompute", None)  # the library travels as source, not as a distribution
    folder = out / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shutil.copyfile(entry, folder / "main.py")
    shutil.copytree(root / "shared" / "fedcompute", folder / "fedcompute", ignore=_IGNORED)
    header = (f"fedcompute Cloud Function {name}: pinned from uv.lock by fedcompute.deploy.package.\n"
              "Do not edit: run `make package`.")
    (folder / "requirements.txt").write_text(requirements_text(pins, header=header))
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
        lock = parse_lock((root / "uv.lock").read_text())
        for name in args.function or sorted(FUNCTIONS):
            result = package_function(name, out, root=root, lock=lock)
            print(f"{name}: {result.zip_path} ({result.zip_path.stat().st_size // 1024} KiB, "
                  f"{len(result.pins)} pinned distributions)")
    except (ConfigError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        hint = getattr(error, "hint", None)
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
