"""The one way untrusted archives and object prefixes become files on disk.

Every zip the code base unpacks (a model uploaded inline or as ``gs://.../model.zip``, a
client plan on a device) and every object prefix it downloads into a directory (a
``gs://`` SavedModel directory) goes through :func:`contained_path`, the single
containment check, plus the same limits:

* names must be relative, non-empty, without ``..`` components, backslashes or NUL, and
  resolve (symlinks followed) inside the target directory;
* symlink entries are refused, and files are created with ``O_EXCL`` so an entry never
  writes through a link or over an earlier entry (duplicate names are refused);
* at most ``max_entries`` entries and ``max_total_bytes`` bytes, counted on the bytes
  actually decompressed (a zip's declared sizes can lie), and a per-entry compression
  ratio cap against zip bombs.

Errors are :class:`UnsafeArchiveError` (HTTP 400) naming the entry and the rule.
"""
from __future__ import annotations

import io
import os
import stat
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from fedcompute.errors import InvalidRequestError

CHUNK_BYTES = 1024 * 1024


class UnsafeArchiveError(InvalidRequestError):
    """An archive entry or object name is unsafe, or the content is over a limit."""


@dataclass(frozen=True)
class ExtractLimits:
    """Bounds on what one archive or prefix may put on disk."""

    max_total_bytes: int = 1024 * 1024 * 1024
    max_entries: int = 10_000
    max_ratio: int = 200  # decompressed / compressed bytes of one entry (big zero tensors compress ~1000x)
    ratio_floor_bytes: int = 1024 * 1024  # entries smaller than this are not ratio-checked


def contained_path(root: Path, name: str, *, what: str) -> Path:
    """``root / name`` after checking it stays inside ``root`` (the containment check).

    ``root`` must be an existing directory. Raises :class:`UnsafeArchiveError`.
    """
    if not name or "\x00" in name or "\\" in name:
        raise UnsafeArchiveError(f"{what}: entry {name!r} has an empty name, a NUL or a backslash")
    pure = PurePosixPath(name)
    if pure.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"{what}: entry {name!r} is an absolute path",
                                 hint="archive and object names must be relative to the model directory")
    if ".." in pure.parts:
        raise UnsafeArchiveError(f"{what}: entry {name!r} contains '..'",
                                 hint="archive and object names must stay inside the model directory")
    base = root.resolve()
    dest = (base / pure).resolve()
    if dest != base and base not in dest.parents:
        raise UnsafeArchiveError(f"{what}: entry {name!r} resolves outside the target directory")
    return dest


class _Budget:
    def __init__(self, limits: ExtractLimits, what: str) -> None:
        self.limits, self.what, self.total, self.entries = limits, what, 0, 0

    def count_entry(self) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise UnsafeArchiveError(f"{self.what} has more than {self.limits.max_entries} entries")

    def add(self, size: int) -> None:
        self.total += size
        if self.total > self.limits.max_total_bytes:
            raise UnsafeArchiveError(f"{self.what} unpacks to more than {self.limits.max_total_bytes} bytes",
                                     hint="upload a smaller model")


def _write_new(dest: Path, chunks: Iterable[bytes], budget: _Budget, name: str,
               check: Callable[[int], None] | None = None) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL + O_NOFOLLOW: never through a symlink, never over an earlier entry.
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError as error:
        raise UnsafeArchiveError(f"{budget.what}: entry {name!r} appears twice") from error
    with os.fdopen(fd, "wb") as out:
        written = 0
        for chunk in chunks:
            written += len(chunk)
            budget.add(len(chunk))
            if check is not None:
                check(written)
            out.write(chunk)


def _chunks(stream: IO[bytes]) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK_BYTES):
        yield chunk


def extract_zip(data: bytes, target: Path, *, what: str, limits: ExtractLimits = ExtractLimits()) -> list[str]:
    """Unpack the zip ``data`` into the directory ``target``; return the file names written."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as error:
        raise UnsafeArchiveError(f"{what} is not a zip archive") from error
    target.mkdir(parents=True, exist_ok=True)
    budget = _Budget(limits, what)
    written: list[str] = []
    with archive:
        infos = archive.infolist()
        if len(infos) > limits.max_entries:
            raise UnsafeArchiveError(f"{what} has {len(infos)} entries, over {limits.max_entries}")
        declared = sum(i.file_size for i in infos)
        if declared > limits.max_total_bytes:
            raise UnsafeArchiveError(f"{what} unpacks to {declared} bytes, over {limits.max_total_bytes}",
                                     hint="upload a smaller model")
        for info in infos:  # every name is checked before anything is written
            contained_path(target, info.filename, what=what)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise UnsafeArchiveError(f"{what}: entry {info.filename!r} is a symbolic link")
        for info in infos:
            budget.count_entry()
            dest = contained_path(target, info.filename, what=what)
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            compressed = max(info.compress_size, 1)

            def ratio_check(size: int, name: str = info.filename, packed: int = compressed) -> None:
                if size > limits.ratio_floor_bytes and size > packed * limits.max_ratio:
                    raise UnsafeArchiveError(f"{what}: entry {name!r} expands more than {limits.max_ratio}x "
                                             "(a zip bomb?)")

            with archive.open(info) as member:
                _write_new(dest, _chunks(member), budget, info.filename, ratio_check)
            written.append(info.filename)
    return written


def download_prefix(list_names: Callable[[str], list[str]], read: Callable[[str], bytes], prefix: str,
                    target: Path, *, what: str, limits: ExtractLimits = ExtractLimits()) -> list[str]:
    """Download every object under ``prefix`` into ``target`` (names relative to the prefix).

    ``list_names(prefix)`` and ``read(name)`` are the blob store's, bound to a bucket.
    Placeholder "directory" objects (names ending in ``/``) are skipped.
    """
    prefix = prefix.rstrip("/") + "/"
    names = [n for n in list_names(prefix) if not n.endswith("/")]
    stray = [n for n in names if not n.startswith(prefix)]
    if stray:
        raise UnsafeArchiveError(f"{what}: object {stray[0]!r} is not under {prefix!r}")
    if len(names) > limits.max_entries:
        raise UnsafeArchiveError(f"{what} has {len(names)} objects, over {limits.max_entries}")
    target.mkdir(parents=True, exist_ok=True)
    relative = [name[len(prefix):] for name in names]
    for rel in relative:  # every name is checked before anything is downloaded
        contained_path(target, rel, what=what)
    budget = _Budget(limits, what)
    for name, rel in zip(names, relative):
        budget.count_entry()
        _write_new(contained_path(target, rel, what=what), [read(name)], budget, rel)
    return relative
