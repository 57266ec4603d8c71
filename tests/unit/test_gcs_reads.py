"""GcsBlobStore.read against a scripted HTTP server standing in for Cloud Storage's JSON API:
the stored bytes come back whole, checked against the CRC32C the server states; a corrupted
or truncated body and HTTP 5xx are retried, then reported as transient; 404 is "not found"."""
from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import google_crc32c
import pytest
from google.api_core import exceptions

from fedcompute.adapters import blobs as blobs_module
from fedcompute.adapters.blobs import GcsBlobStore
from fedcompute.errors import NotFoundError, TransientError

BODY = bytes(range(256)) * 4096  # 1 MiB: several socket reads


def _crc(data: bytes) -> str:
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


@dataclass
class ScriptedStorage:
    """Answers each GET with the next scripted reply: (status, body, x-goog-hash, declared length)."""

    url: str
    replies: list[tuple[int, bytes, str, int | None]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


def _answer(conn: socket.socket, reply: tuple[int, bytes, str, int | None]) -> None:
    status, body, crc, length = reply
    head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body) if length is None else length}",
            "Content-Type: application/octet-stream", "Connection: close"]
    if crc:
        head.append(f"x-goog-hash: crc32c={crc},md5=AAAA")
    conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)


@pytest.fixture
def storage() -> Iterator[ScriptedStorage]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.05)  # accept() wakes up to see the test has ended
    scripted = ScriptedStorage(f"http://127.0.0.1:{server.getsockname()[1]}")
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                request = conn.recv(65536).split(b"\r\n", 1)[0].decode()
                scripted.paths.append(request.split(" ")[1])
                _answer(conn, scripted.replies.pop(0) if scripted.replies else (500, b"", "", None))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield scripted
    stop.set()
    thread.join(timeout=5)
    server.close()


@pytest.fixture
def blob_store(storage: ScriptedStorage, monkeypatch: pytest.MonkeyPatch) -> GcsBlobStore:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setattr(blobs_module, "RETRY_BACKOFF_S", 0.01)
    client = gcs.Client(project="p", credentials=AnonymousCredentials(),
                        client_options={"api_endpoint": storage.url})
    return GcsBlobStore(client, public_base_url="")


def test_a_read_returns_the_stored_bytes_from_the_objects_media_url(storage, blob_store) -> None:
    storage.replies = [(200, BODY, _crc(BODY), None)]
    assert blob_store.read("bucket", "pop/1/2/d/a b/gradient") == BODY
    assert storage.paths == ["/download/storage/v1/b/bucket/o/pop%2F1%2F2%2Fd%2Fa%20b%2Fgradient?alt=media"]


def test_a_body_that_does_not_match_its_crc32c_is_read_again(storage, blob_store) -> None:
    corrupted = b"\xff" + BODY[1:]
    storage.replies = [(200, corrupted, _crc(BODY), None), (200, BODY, _crc(BODY), None)]
    assert blob_store.read("bucket", "name") == BODY
    assert len(storage.paths) == 2


def test_a_truncated_body_is_read_again(storage, blob_store) -> None:
    storage.replies = [(200, BODY[: len(BODY) // 2], _crc(BODY), len(BODY)), (200, BODY, _crc(BODY), None)]
    assert blob_store.read("bucket", "name") == BODY
    assert len(storage.paths) == 2


def test_an_unavailable_storage_is_retried_then_reported_as_transient(storage, blob_store) -> None:
    storage.replies = [(503, b"busy", "", None), (200, BODY, _crc(BODY), None)]
    assert blob_store.read("bucket", "name") == BODY
    storage.paths.clear()
    storage.replies = [(200, b"garbage", _crc(BODY), None)] * blobs_module.READ_ATTEMPTS
    with pytest.raises(TransientError, match="do not match the stored CRC32C"):
        blob_store.read("bucket", "name")
    assert len(storage.paths) == blobs_module.READ_ATTEMPTS


def test_a_missing_object_is_not_found_and_a_refusal_is_raised_at_once(storage, blob_store) -> None:
    storage.replies = [(404, b"{}", "", None), (403, b'{"error": {"message": "denied"}}', "", None)]
    with pytest.raises(NotFoundError, match="gs://bucket/name does not exist"):
        blob_store.read("bucket", "name")
    with pytest.raises(exceptions.Forbidden):
        blob_store.read("bucket", "name")
    assert len(storage.paths) == 2  # neither is retried
