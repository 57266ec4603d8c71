"""Device identity: a key pair per device, signed requests, per-identity limits (light).

ODP's devices prove they are real Android devices with *key attestation*: on a 401 the
server sends a challenge (``AuthenticationMetadata.key_attestation_metadata``); the device
generates an EC key in the Android Keystore bound to that challenge and sends the
certificate chain (rooted in Google's hardware attestation root) with a fresh authorization
token; the server verifies the chain and from then on accepts the token.

fedcompute's serverless equivalent, without hardware attestation:

* a device holds an Ed25519 key pair (:class:`DeviceKey`) and presents its public key in
  every check-in and report-result (``DeviceAuth``, field 100 of both requests);
* it signs the request (method, path, timestamp, nonce, body digest); the server verifies
  the signature and refuses timestamps outside :data:`MAX_CLOCK_SKEW_S`;
* the identity is derived from the public key (:func:`device_id_for`): no registration
  document, no extra storage round trip;
* one assignment per identity per round: the assignment id is a keyed hash of identity and
  round (:func:`assignment_id_for`), so a second check-in collides on the create-only
  assignment document (the conditional create the check-in does anyway);
* report-result must be signed by the key that checked in (the assignment records it);
* a per-identity rate limit on check-ins (:class:`RateLimiter`, in process memory).

Replays inside the skew window gain nothing: a replayed check-in maps to the same
assignment id, a replayed report is idempotent. What this does not give (anyone can mint
keys) is in the README's "Device identity" section.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedcompute.errors import FedComputeError, InvalidRequestError, UnauthenticatedError

SIGNATURE_CONTEXT = b"fedcompute-device-request-v1"
MAX_CLOCK_SKEW_S = 300.0
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
NONCE_BYTES = 16


class RateLimitedError(FedComputeError):
    """Too many requests from one device identity (HTTP 429 with ``Retry-After``)."""

    http_status = 429

    def __init__(self, message: str, *, retry_after_s: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after_s = retry_after_s


def device_id_for(public_key: bytes) -> str:
    """The stable identity of a device key: the first 128 bits of SHA-256, in hex."""
    return hashlib.sha256(b"fedcompute-device-id|" + public_key).hexdigest()[:32]


def signing_payload(method: str, path: str, timestamp_ms: int, nonce: bytes, body_digest: bytes) -> bytes:
    """The bytes a device signs: context, method, path, time, nonce and the body's SHA-256."""
    return b"\n".join((SIGNATURE_CONTEXT, method.upper().encode(), path.encode(), str(int(timestamp_ms)).encode(),
                       nonce.hex().encode(), body_digest.hex().encode()))


@dataclass(frozen=True)
class SignedRequest:
    """What ``DeviceAuth`` carries (wire-independent)."""

    public_key: bytes
    timestamp_ms: int
    nonce: bytes
    signature: bytes


class DeviceKey:
    """A device's Ed25519 key pair (device side)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self.public_key = private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                                serialization.PublicFormat.Raw)
        self.device_id = device_id_for(self.public_key)

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        """Picklable (fleets hand devices to worker processes)."""
        raw = self._private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                          serialization.NoEncryption())
        return _key_from_private_bytes, (raw,)

    @classmethod
    def generate(cls) -> DeviceKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> DeviceKey:
        """A deterministic key from 32 seed bytes (reproducible simulated fleets)."""
        return cls(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest()))

    def sign(self, method: str, path: str, body_digest: bytes, *,
             now: Callable[[], float] = time.time, nonce: bytes | None = None) -> SignedRequest:
        timestamp_ms = int(now() * 1000)
        nonce = nonce if nonce is not None else os.urandom(NONCE_BYTES)
        signature = self._private.sign(signing_payload(method, path, timestamp_ms, nonce, body_digest))
        return SignedRequest(self.public_key, timestamp_ms, nonce, signature)


def _key_from_private_bytes(raw: bytes) -> DeviceKey:
    return DeviceKey(Ed25519PrivateKey.from_private_bytes(raw))


def verify_request(request: SignedRequest, method: str, path: str, body_digest: bytes, *,
                   now: Callable[[], float] = time.time, max_skew_s: float = MAX_CLOCK_SKEW_S) -> str:
    """The device id of a correctly signed, fresh request; :class:`UnauthenticatedError` otherwise."""
    hint = "sign the request with the device key (fedcompute.identity.DeviceKey.sign)"
    if len(request.public_key) != PUBLIC_KEY_BYTES:
        raise InvalidRequestError(f"device_auth.public_key must be {PUBLIC_KEY_BYTES} bytes (raw Ed25519)", hint=hint)
    if len(request.signature) != SIGNATURE_BYTES:
        raise InvalidRequestError(f"device_auth.signature must be {SIGNATURE_BYTES} bytes", hint=hint)
    if len(request.nonce) != NONCE_BYTES:
        raise InvalidRequestError(f"device_auth.nonce must be {NONCE_BYTES} bytes", hint=hint)
    skew = abs(now() - request.timestamp_ms / 1000.0)
    if skew > max_skew_s:
        raise UnauthenticatedError(f"device_auth.timestamp_ms is {skew:.0f} s away from the server's clock "
                                   f"(more than {max_skew_s:.0f} s)", hint="sync the device clock and sign afresh")
    try:
        key = Ed25519PublicKey.from_public_bytes(request.public_key)
        key.verify(request.signature, signing_payload(method, path, request.timestamp_ms, request.nonce, body_digest))
    except (InvalidSignature, ValueError) as error:
        raise UnauthenticatedError("device_auth.signature does not verify for this request", hint=hint) from error
    return device_id_for(request.public_key)


def assignment_id_for(secret: bytes, device_id: str, population: str, task_id: int, round_number: int) -> str:
    """The one assignment id ``device_id`` can hold in a round, as a GUID-shaped string.

    Keyed with the task's server-side secret, so the id neither reveals nor links the
    device across rounds to anyone without that secret.
    """
    digest = hmac.new(secret, f"assignment-id|{device_id}|{population}|{task_id}|{round_number}".encode(),
                      hashlib.sha256).digest()
    h = digest[:16].hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def encode_key(public_key: bytes) -> str:
    return base64.urlsafe_b64encode(public_key).decode().rstrip("=")


class RateLimiter:
    """A token bucket per identity, in process memory, for at most ``max_keys`` identities.

    ``rate_per_s`` tokens refill per second up to ``burst``. Least recently seen identities
    are forgotten past ``max_keys`` (bounded memory; a forgotten identity starts with a
    full bucket). In the cloud each function instance limits on its own.
    """

    def __init__(self, rate_per_s: float, burst: float, *, max_keys: int = 100_000,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.max_keys, self._now = rate_per_s, burst, max_keys, now
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        if self.rate <= 0:
            return True
        t = self._now()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, t))
            tokens = min(self.burst, tokens + (t - last) * self.rate)
            allowed = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if allowed else tokens, t)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return allowed

    def check(self, key: str) -> None:
        if not self.allow(key):
            raise RateLimitedError(f"device {key} checks in too often (limit {self.rate * 60:g}/min)",
                                   retry_after_s=max(1, math.ceil(1.0 / self.rate)),
                                   hint="retry after the Retry-After seconds")


DEVICE_AUTH_REQUIRED = "required"
DEVICE_AUTH_OPTIONAL = "optional"


def authenticate_message(message: Any, method: str, path: str, *, required: bool,
                         now: Callable[[], float] = time.time) -> str:
    """Verify the ``device_auth`` of a parsed request message; the device id ("" if unsigned).

    The signed body digest is the SHA-256 of the message serialized deterministically with
    ``device_auth`` cleared. Raises :class:`UnauthenticatedError` (HTTP 401) when a
    signature is required and missing, or present and wrong.
    """
    if not message.HasField("device_auth"):
        if required:
            raise UnauthenticatedError("this server requires signed device requests (device_auth is missing)",
                                       hint="sign check-in and report-result with a device key "
                                       "(fedcompute.fleet.protocol does)")
        return ""
    auth = message.device_auth
    signed = SignedRequest(bytes(auth.public_key), int(auth.timestamp_ms), bytes(auth.nonce), bytes(auth.signature))
    return verify_request(signed, method, path, message_digest(message), now=now)


def message_digest(message: Any) -> bytes:
    """SHA-256 of ``message`` serialized deterministically without its ``device_auth``."""
    unsigned = type(message)()
    unsigned.CopyFrom(message)
    unsigned.ClearField("device_auth")
    return hashlib.sha256(unsigned.SerializeToString(deterministic=True)).digest()


def sign_message(key: DeviceKey, message: Any, method: str, path: str, *,
                 now: Callable[[], float] = time.time) -> None:
    """Set ``message.device_auth`` to ``key``'s signature of the request (device side)."""
    signed = key.sign(method, path, message_digest(message), now=now)
    auth = message.device_auth
    auth.public_key, auth.timestamp_ms, auth.nonce, auth.signature = (
        signed.public_key, signed.timestamp_ms, signed.nonce, signed.signature)
