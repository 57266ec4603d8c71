"""fedcompute.safe_extract: the one containment check for archives and object prefixes
(issue 13, High 2: gs:// model directories with ``../`` or ``/`` names; zip-slip, zip bombs)."""
from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import pytest

from fedcompute.memory import InMemoryBlobStore
from fedcompute.proto import common_pb2
from fedcompute.safe_extract import ExtractLimits, UnsafeArchiveError, contained_path, download_prefix, extract_zip
from fedcompute.taskbuilder.service import fetch_saved_model


def zip_of(entries: dict[str, bytes], *, symlinks: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        for name in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def files_under(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


def test_a_well_formed_archive_unpacks_into_the_target(tmp_path: Path) -> None:
    data = zip_of({"saved_model.pb": b"pb", "variables/variables.index": b"idx"})
    assert extract_zip(data, tmp_path / "out", what="model") == ["saved_model.pb", "variables/variables.index"]
    assert files_under(tmp_path / "out") == ["saved_model.pb", "variables/variables.index"]


@pytest.mark.parametrize("name, rule", [
    ("../escape.txt", "contains '..'"),
    ("a/../../escape.txt", "contains '..'"),
    ("/tmp/escape.txt", "absolute path"),
    ("C:/escape.txt", "absolute path"),
    ("a\\..\\escape.txt", "backslash"),
])
def test_escaping_entry_names_are_refused_before_anything_is_written(tmp_path: Path, name: str, rule: str) -> None:
    data = zip_of({"saved_model.pb": b"pb", name: b"x"})
    with pytest.raises(UnsafeArchiveError, match=rule):
        extract_zip(data, tmp_path / "out", what="model")
    assert files_under(tmp_path) == []


def test_symlink_entries_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        extract_zip(zip_of({"saved_model.pb": b"pb"}, symlinks=("variables",)), tmp_path / "out", what="model")
    assert files_under(tmp_path) == []


def test_a_symlink_already_in_the_target_cannot_be_written_through(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "out"
    target.mkdir()
    (target / "link").symlink_to(outside)
    with pytest.raises(UnsafeArchiveError, match="resolves outside"):
        extract_zip(zip_of({"link/file": b"x"}), target, what="model")
    assert list(outside.iterdir()) == []


def test_duplicate_entries_are_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, pytest.warns(UserWarning, match="Duplicate name"):
        archive.writestr("saved_model.pb", b"one")
        archive.writestr("saved_model.pb", b"two")
    with pytest.raises(UnsafeArchiveError, match="appears twice"):
        extract_zip(buffer.getvalue(), tmp_path / "out", what="model")


def test_too_many_entries_are_refused(tmp_path: Path) -> None:
    data = zip_of({f"f{i}": b"x" for i in range(5)})
    with pytest.raises(UnsafeArchiveError, match="5 entries, over 4"):
        extract_zip(data, tmp_path / "out", what="model", limits=ExtractLimits(max_entries=4))


def test_declared_size_over_the_limit_is_refused_before_decompressing(tmp_path: Path) -> None:
    data = zip_of({"big": bytes(2000)})
    with pytest.raises(UnsafeArchiveError, match="unpacks to 2000 bytes, over 1000"):
        extract_zip(data, tmp_path / "out", what="model", limits=ExtractLimits(max_total_bytes=1000))
    assert files_under(tmp_path) == []


def test_a_zip_bomb_entry_is_refused_by_its_compression_ratio(tmp_path: Path) -> None:
    data = zip_of({"bomb": bytes(8 * 1024 * 1024)})  # 8 MiB of zeros -> about 8 KiB
    assert len(data) < 64 * 1024
    with pytest.raises(UnsafeArchiveError, match="zip bomb"):
        extract_zip(data, tmp_path / "out", what="model")


def test_containment_check_accepts_nested_relative_names(tmp_path: Path) -> None:
    assert contained_path(tmp_path, "a/b/c.txt", what="x") == (tmp_path / "a" / "b" / "c.txt").resolve()


# --------------------------------------------------------------------------- object prefixes


def model_bucket_with(names: dict[str, bytes]) -> InMemoryBlobStore:
    blobs = InMemoryBlobStore()
    for name, data in names.items():
        blobs.write("models", name, data)
    return blobs


@pytest.mark.parametrize("evil", ["m/../../escape.txt", "m//tmp/escape.txt", "m/variables/../../escape.txt"])
def test_gs_model_directory_with_escaping_object_names_is_refused(tmp_path: Path, evil: str) -> None:
    blobs = model_bucket_with({"m/saved_model.pb": b"pb", evil: b"x"})
    resource = common_pb2.Resource(uri="gs://models/m")
    with pytest.raises(UnsafeArchiveError, match="gs://models/m: entry"):
        fetch_saved_model(resource, blobs, tmp_path / "build" / "model")
    assert files_under(tmp_path) == []


def test_gs_model_directory_downloads_into_the_build_directory(tmp_path: Path) -> None:
    blobs = model_bucket_with({"m/saved_model.pb": b"pb", "m/variables/v.index": b"i", "m/": b""})
    root = fetch_saved_model(common_pb2.Resource(uri="gs://models/m/"), blobs, tmp_path / "model")
    assert root == tmp_path / "model"
    assert files_under(tmp_path) == ["model/saved_model.pb", "model/variables/v.index"]


def test_prefix_download_counts_bytes_and_objects(tmp_path: Path) -> None:
    blobs = model_bucket_with({f"m/{i}": bytes(600) for i in range(3)})
    with pytest.raises(UnsafeArchiveError, match="more than 1000 bytes"):
        download_prefix(lambda p: blobs.list("models", p), lambda n: blobs.read("models", n), "m", tmp_path / "a",
                        what="gs://models/m", limits=ExtractLimits(max_total_bytes=1000))
    with pytest.raises(UnsafeArchiveError, match="3 objects, over 2"):
        download_prefix(lambda p: blobs.list("models", p), lambda n: blobs.read("models", n), "m", tmp_path / "b",
                        what="gs://models/m", limits=ExtractLimits(max_entries=2))


def test_inline_zip_model_goes_through_the_same_check(tmp_path: Path) -> None:
    resource = common_pb2.Resource(inline_resource=common_pb2.Resource.InlineResource(
        data=zip_of({"saved_model.pb": b"pb", "../../escape.txt": b"x"})))
    with pytest.raises(UnsafeArchiveError, match="inline saved_model: entry '../../escape.txt'"):
        fetch_saved_model(resource, InMemoryBlobStore(), tmp_path / "model")
    assert files_under(tmp_path) == []
