"""Write Terraform's copy of the function catalogue (``fedcompute.catalogue``).

``python -m fedcompute.deploy.catalogue --write`` writes ``infra/modules/functions/catalogue.json``,
which ``modules/functions`` reads with ``jsondecode(file())`` for each function's runtime,
default maximum instances and concurrency; ``--check`` exits 1 when the committed file is
stale. ``make package`` runs ``--write``; a unit test fails when the file differs.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from fedcompute.catalogue import terraform_catalogue

CATALOGUE_JSON = Path("infra") / "modules" / "functions" / "catalogue.json"


def render() -> str:
    """The file's exact text (sorted keys, two-space indent, final newline)."""
    return json.dumps(terraform_catalogue(), indent=2, sort_keys=True) + "\n"


def repo_root() -> Path:
    """The repository root (``shared/fedcompute/deploy`` -> up three levels)."""
    return Path(__file__).resolve().parents[3]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``--write`` the file or ``--check`` it (exit 1 when stale)."""
    parser = argparse.ArgumentParser(prog="python -m fedcompute.deploy.catalogue",
                                     description="Write infra's catalogue.json from fedcompute.catalogue.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="write the file")
    action.add_argument("--check", action="store_true", help="exit 1 when the file differs from the catalogue")
    parser.add_argument("--root", default=None, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    path = (Path(args.root).resolve() if args.root else repo_root()) / CATALOGUE_JSON
    text = render()
    if args.write:
        path.write_text(text)
        print(f"wrote {path}")
        return 0
    current = path.read_text() if path.is_file() else None
    if current != text:
        print(f"error: {path} differs from fedcompute.catalogue", file=sys.stderr)
        print("hint: run `python -m fedcompute.deploy.catalogue --write` (or `make package`) and commit it",
              file=sys.stderr)
        return 1
    print(f"{path} is current")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
