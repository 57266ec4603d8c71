"""Object storage: the GCS adapter of the :class:`~fedcompute.ports.BlobStore` port (its
in-memory fake is :class:`fedcompute.memory.InMemoryBlobStore`).

All writes that must happen once use generation preconditions
(``if_generation_match=0`` = create only if absent), so a retried or re-run function
never overwrites a checkpoint or an upload.
"""
from __future__ import annotations

import base64
import contextlib
import datetime
import os
import time
import urllib.parse
from typing import Any

from fedcompute.adapters.http import read_whole_body
from fedcompute.errors import NotFoundError, PreconditionFailedError, TransientError

UPLOAD_HEADERS = {"content-type": "application/octet-stream"}
XML_API_ENDPOINT = "https://storage.googleapis.com"
# Reads: attempts per object, the first back-off (doubling, at most 2 s) and the statuses retried.
READ_ATTEMPTS = 4
RETRY_BACKOFF_S = 0.25
RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
READ_TIMEOUT_S = 60.0


def _crc32c(data: bytes) -> int:
    import google_crc32c

    return int(google_crc32c.value(data))


def _crc32c_of(x_goog_hash: str) -> int | None:
    """The CRC32C in an ``x-goog-hash`` header (``crc32c=<base64>,md5=<base64>``), if any."""
    for part in x_goog_hash.split(","):
        kind, _, value = part.strip().partition("=")
        if kind == "crc32c" and value:
            try:
                return int.from_bytes(base64.b64decode(value + "=" * (-len(value) % 4), validate=True), "big")
            except ValueError:
                return None
    return None


class GcsBlobStore:
    """:class:`BlobStore` on ``google.cloud.storage.Client`` (real GCS or fake-gcs-server)."""

    def __init__(self, client: Any, *, public_base_url: str | None = None, signed_url_minutes: int = 15,
                 xml_session: Any = None) -> None:
        self._client = client
        # HTTP session for XML API calls (bounded upload sessions); None: authorized from the client.
        self._xml_session = xml_session
        # Locally the emulator serves downloads without signatures; in the cloud we sign.
        self._public_base_url = public_base_url if public_base_url is not None else os.environ.get("STORAGE_EMULATOR_HOST", "")
        self._signed_url_minutes = signed_url_minutes

    def _blob(self, bucket: str, name: str):
        return self._client.bucket(bucket).blob(name)

    def read(self, bucket, name):
        """The object's stored bytes (a gzip'd object stays gzip'd), checked against its CRC32C.

        One GET over the client's authorized session, read in one piece (see
        :func:`~fedcompute.adapters.http.read_whole_body`): on fake-gcs-server, 10 sealed CNN
        updates of 8.8 MB read on the aggregator's 16 read-ahead threads took 248 ms through
        ``Blob.download_as_bytes`` and 53 ms this way (``benchmarks/bench_storage_ops.py``).
        A broken connection, a checksum mismatch or HTTP 408/429/5xx is retried
        :data:`READ_ATTEMPTS` times, as the library would, then raised as :class:`TransientError`.
        """
        import requests
        from google.api_core import exceptions

        url = self._blob(bucket, name)._get_download_url(self._client)
        failure: Exception | None = None
        for attempt in range(READ_ATTEMPTS):
            if attempt:
                time.sleep(min(RETRY_BACKOFF_S * 2 ** (attempt - 1), 2.0))
            try:
                response = self._client._http.get(url, stream=True, timeout=READ_TIMEOUT_S)
                if response.status_code != 200:
                    with contextlib.closing(response):
                        if response.status_code in RETRIED_STATUSES:
                            failure = TransientError(f"HTTP {response.status_code}")
                            continue
                        if response.status_code == 404:
                            raise NotFoundError(f"gs://{bucket}/{name} does not exist")
                        raise exceptions.from_http_response(response)
                data = read_whole_body(response, decode_content=False)
            except requests.RequestException as error:
                failure = error
                continue
            stored = _crc32c_of(response.headers.get("x-goog-hash", ""))
            if stored is not None and stored != _crc32c(data):
                failure = TransientError(f"{len(data)} bytes read do not match the stored CRC32C")
                continue
            return data
        raise TransientError(f"could not read gs://{bucket}/{name} after {READ_ATTEMPTS} attempts: {failure}",
                             hint="storage is unavailable or the read was corrupted; retry later") from failure

    def write(self, bucket, name, data, *, create_only=False, content_type="application/octet-stream"):
        from google.api_core import exceptions

        try:
            self._blob(bucket, name).upload_from_string(
                data, content_type=content_type, if_generation_match=0 if create_only else None
            )
            return True
        except exceptions.PreconditionFailed:
            return False
        except (exceptions.ServiceUnavailable, exceptions.InternalServerError, exceptions.TooManyRequests) as error:
            raise TransientError(f"could not write gs://{bucket}/{name}: {error}") from error

    def exists(self, bucket, name):
        return self._blob(bucket, name).exists()

    def list(self, bucket, prefix):
        return sorted(b.name for b in self._client.list_blobs(bucket, prefix=prefix))

    def delete(self, bucket, name):
        from google.api_core import exceptions

        try:
            self._blob(bucket, name).delete()
        except exceptions.NotFound:
            pass

    def download_url(self, bucket, name):
        if self._public_base_url:
            quoted = urllib.parse.quote(name, safe="")
            return f"{self._public_base_url.rstrip('/')}/storage/v1/b/{bucket}/o/{quoted}?alt=media"
        return self._blob(bucket, name).generate_signed_url(
            version="v4", expiration=datetime.timedelta(minutes=self._signed_url_minutes), method="GET",
            **self._signing_credentials(),
        )

    def _signing_credentials(self) -> dict[str, str]:
        """Cloud Functions' credentials hold no private key: sign through IAM signBlob.

        Passing the service account e-mail and an access token makes the client call the
        IAM credentials API (the function's account needs iam.serviceAccountTokenCreator on
        itself, which infra/ grants).
        """
        credentials = getattr(self._client, "_credentials", None)
        if credentials is None or hasattr(credentials, "sign_bytes") and getattr(credentials, "signer", None):
            return {}
        import google.auth.transport.requests

        if not credentials.valid:
            credentials.refresh(google.auth.transport.requests.Request())
        email = getattr(credentials, "service_account_email", None)
        return {"service_account_email": email, "access_token": credentials.token} if email else {}

    def create_upload_session(self, bucket, name, *, gzip=False, max_bytes=None, first=False):
        """A resumable upload session for exactly this object, valid for one write.

        ``gzip``: the device is told to gzip its update (the object is stored with
        ``Content-Encoding: gzip``); otherwise it uploads the raw bytes.

        ``max_bytes``: in the cloud the session is started through the XML API with
        ``x-goog-content-length-range: 0,max_bytes``, so GCS refuses a larger upload and a
        device cannot store more than its update (the JSON API's session takes only an exact
        length). fake-gcs-server has no such bound: locally ingestion rejects and deletes an
        oversized object by the size in its finalize event, before reading it.

        ``if_generation_match=0`` makes the session fail if the object already exists, so
        a device can write its update once and nothing else. fake-gcs-server ignores that
        precondition on resumable uploads (measured: a second session's PUT overwrites), so
        an existing object is also refused here, before a session is handed out — unless
        ``first``: the caller knows no session for this object was ever handed out (the
        assignment's first report), so nothing can have written it.

        Raises:
            PreconditionFailedError: the object already exists.
        """
        if max_bytes is not None and not self._public_base_url:
            return self._bounded_session(bucket, name, gzip=gzip, max_bytes=int(max_bytes)), dict(UPLOAD_HEADERS)
        blob = self._blob(bucket, name)
        # Only against the emulator: real GCS enforces if_generation_match=0 on the session,
        # and the assignment function may create objects in the gradient bucket but not read them.
        if self._public_base_url and not first and blob.exists():
            raise PreconditionFailedError(
                f"gs://{bucket}/{name} was already uploaded; an update is written once",
                hint="the upload is done: nothing to resend",
            )
        if gzip:
            blob.content_encoding = "gzip"
        url = blob.create_resumable_upload_session(
            content_type="application/octet-stream", if_generation_match=0, checksum=None
        )
        return url, {"content-type": "application/octet-stream"}

    def _bounded_session(self, bucket: str, name: str, *, gzip: bool, max_bytes: int) -> str:
        """Start an XML API resumable upload limited to ``max_bytes``, create-only; its session URI."""
        from google.auth.transport.requests import AuthorizedSession

        headers = {**UPLOAD_HEADERS, "x-goog-resumable": "start", "x-goog-if-generation-match": "0",
                   "x-goog-content-length-range": f"0,{max_bytes}", "content-length": "0"}
        if gzip:
            headers["content-encoding"] = "gzip"
        url = f"{XML_API_ENDPOINT}/{urllib.parse.quote(bucket, safe='')}/{urllib.parse.quote(name, safe='/')}"
        if self._xml_session is None:
            self._xml_session = AuthorizedSession(self._client._credentials)
        session = self._xml_session
        response = session.post(url, headers=headers, data=b"", timeout=30)
        if response.status_code == 412:
            raise PreconditionFailedError(f"gs://{bucket}/{name} was already uploaded; an update is written once",
                                          hint="the upload is done: nothing to resend")
        if response.status_code in (429, 500, 502, 503, 504):
            raise TransientError(f"could not start an upload to gs://{bucket}/{name}: HTTP {response.status_code}")
        if response.status_code not in (200, 201) or "location" not in {k.lower() for k in response.headers}:
            raise TransientError(f"GCS refused to start an upload to gs://{bucket}/{name}: "
                                 f"HTTP {response.status_code} {response.text[:200]}")
        return str(response.headers["Location"])

