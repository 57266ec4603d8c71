"""HTTP sessions for clients of the functions (the fleet, the management client, the push relay)."""
from __future__ import annotations

import requests


def keep_alive_session(*, resend_any_method: bool) -> requests.Session:
    """A keep-alive session that resends a request once when its pooled connection was closed.

    Servers close idle keep-alive connections (gunicorn after 2 s); a client that reuses one
    just then gets "connection reset" or "remote end closed connection" before the server saw
    its request. One retry on a fresh connection is what an HTTP client library on a phone
    does too. ``resend_any_method``: also resend a POST whose answer was lost; only for
    requests that are safe twice (the device protocol and Pub/Sub pushes are at-least-once).
    Otherwise only idempotent methods (GET, PUT, DELETE, ...) are resent after a lost answer.
    """
    from requests.adapters import HTTPAdapter, Retry  # urllib3's, as requests uses it

    session = requests.Session()
    methods = None if resend_any_method else Retry.DEFAULT_ALLOWED_METHODS
    retry = Retry(total=1, connect=1, read=1, status=0, other=0, allowed_methods=methods, raise_on_status=False)
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def read_whole_body(response: requests.Response, *, decode_content: bool = True) -> bytes:
    """The body of a ``stream=True`` response, in one read; the response is closed after.

    ``response.content`` (and google-cloud-storage's downloads) assemble a body from small
    chunks. With a few threads downloading multi-megabyte objects at once that loop fights
    for the GIL: on fake-gcs-server, 10 objects of 8.8 MB took 173 ms one after another and
    248 ms on 16 threads through ``Blob.download_as_bytes``, 53-60 ms either way through one
    read (``benchmarks/bench_storage_ops.py``).
    ``decode_content=False`` keeps a ``Content-Encoding: gzip`` body as stored.

    Raises:
        requests.ConnectionError: the connection broke before the whole body arrived
            (urllib3 checks it against Content-Length).
    """
    import urllib3

    try:
        return response.raw.read(decode_content=decode_content)
    except urllib3.exceptions.HTTPError as error:
        raise requests.ConnectionError(f"reading the body of {response.url} failed: {error}") from error
    finally:
        response.close()
