"""Confidential uploads: HPKE-sealed device updates and the server's upload key ring.

The suite is ODP's: RFC 9180 base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
ChaCha20-Poly1305 (``cryptography``'s ``hpke`` module). A device seals
``gzip(ClientUpdate)`` to the public key named in its assignment and uploads ODP's JSON
envelope (gzip'd like every upload)::

    {"keyId": "<key id>", "encryptedPayload": base64(enc || ciphertext),
     "associatedData": base64(<JSON object>)}

``associatedData`` is the HPKE ``info`` (as ODP's server uses it). fedcompute devices put
``{"assignmentId": "<id>"}`` in it, and the server refuses an envelope whose assignment is
not the one the object was uploaded for, so a sealed update cannot be replayed into
another assignment.

Only ingestion and the aggregator hold private keys (:class:`UploadKeyRing`, loaded from a
JSON key file locally or a Secret Manager secret in the cloud); check-in only needs
:class:`PublicUploadKey`. Rotation adds a key and makes it current while older keys stay
for decryption (uploads sealed before the rotation still open), up to :data:`KEEP_KEYS`.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pybase64
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedcompute.errors import ConfigError, InvalidRequestError

SUITE_NAME = "DHKEM_X25519_HKDF_SHA256/HKDF_SHA256/CHACHA20_POLY1305"
KEEP_KEYS = 4  # the current key and the three before it stay usable for decryption
KEY_BYTES = 32
MAX_ENVELOPE_FIELD = 64 * 1024 * 1024
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# The envelope exactly as seal_update lays it out. Opening one that matches skips the JSON
# parse of its multi-megabyte payload string (json.loads + base64 were 3/4 of opening a CNN
# update); any other layout, or anything this reading refuses, goes to the JSON parser.
_KEY_FIELD = b'{"keyId":"'
_PAYLOAD_FIELD = b'","encryptedPayload":"'
_ASSOCIATED_FIELD = b'","associatedData":"'
_JSON_WHITESPACE = b" \t\r\n"


def _read_laid_out_envelope(data: bytes) -> tuple[str, bytes, bytes] | None:
    """(key id, sealed bytes, associated data) of an envelope in ``seal_update``'s layout, else None.

    Gives what ``json.loads`` would for every input it accepts: the key id holds no quote,
    backslash or control character, and both base64 fields only base64's alphabet (checked
    by the decoder), so none of the three strings has a JSON escape.
    """
    if not data.startswith(_KEY_FIELD):
        return None
    key_end = data.find(b'"', len(_KEY_FIELD))
    if key_end < 0 or not data.startswith(_PAYLOAD_FIELD, key_end):
        return None
    key = data[len(_KEY_FIELD):key_end]
    if b"\\" in key or any(byte < 0x20 for byte in key):
        return None
    payload_start = key_end + len(_PAYLOAD_FIELD)
    payload_end = data.find(b'"', payload_start)
    if payload_end < 0 or not data.startswith(_ASSOCIATED_FIELD, payload_end):
        return None
    associated_start = payload_end + len(_ASSOCIATED_FIELD)
    associated_end = data.find(b'"', associated_start)
    if associated_end < 0 or data[associated_end + 1:].rstrip(_JSON_WHITESPACE) != b"}":
        return None
    try:
        return (key.decode(),
                pybase64.b64decode(memoryview(data)[payload_start:payload_end], validate=True),
                pybase64.b64decode(data[associated_start:associated_end], validate=True))
    except (ValueError, binascii.Error):  # UnicodeDecodeError is a ValueError
        return None


def _read_envelope(data: bytes) -> tuple[str, bytes, bytes]:
    """(key id, sealed bytes, associated data) of a JSON envelope; ValueError, KeyError,
    TypeError or binascii.Error when it is not one."""
    laid_out = _read_laid_out_envelope(data)
    if laid_out is not None:
        return laid_out
    envelope = json.loads(data)
    key_id = envelope["keyId"]
    if not isinstance(key_id, str):
        raise TypeError(f"keyId is {type(key_id).__name__}, not a string")
    return (key_id, pybase64.b64decode(envelope["encryptedPayload"], validate=True),
            pybase64.b64decode(envelope.get("associatedData", ""), validate=True))


@dataclass(frozen=True)
class PublicUploadKey:
    """What a check-in hands to devices: the key id and the raw X25519 public key."""

    key_id: str
    public_key: bytes


def seal_update(payload: bytes, key: PublicUploadKey, *, assignment_id: str) -> bytes:
    """The JSON envelope of ``payload`` (already gzip'd ClientUpdate bytes) sealed to ``key``."""
    associated = json.dumps({"assignmentId": assignment_id}, separators=(",", ":")).encode()
    sealed = _SUITE.encrypt(payload, X25519PublicKey.from_public_bytes(key.public_key), info=associated)
    # The same bytes as json.dumps of the envelope dict, composed directly: base64 needs no
    # JSON escaping, and json.dumps of a multi-megabyte string took 3/4 of a device's sealing.
    return b"".join((b'{"keyId":', json.dumps(key.key_id).encode(), b',"encryptedPayload":"',
                     pybase64.b64encode(sealed), b'","associatedData":"', pybase64.b64encode(associated), b'"}'))


def is_envelope(data: bytes) -> bool:
    return data.lstrip()[:1] == b"{"


@dataclass(frozen=True)
class _Key:
    key_id: str
    private_key: X25519PrivateKey
    created: float


class UploadKeyRing:
    """The server's HPKE private keys, newest last; opens sealed uploads."""

    def __init__(self, keys: Sequence[_Key]) -> None:
        if not keys:
            raise ConfigError("the upload key ring is empty", hint="create one with `fedcompute ops rotate-upload-key`")
        self._keys = tuple(keys)
        self._by_id = {k.key_id: k for k in self._keys}

    # -- keys ----------------------------------------------------------------------------
    @classmethod
    def generate(cls) -> UploadKeyRing:
        return cls([_new_key()])

    def rotated(self) -> UploadKeyRing:
        """A new current key; the previous ones kept for in-flight uploads (at most KEEP_KEYS)."""
        return UploadKeyRing([*self._keys, _new_key()][-KEEP_KEYS:])

    @property
    def current(self) -> PublicUploadKey:
        key = self._keys[-1]
        return PublicUploadKey(key.key_id, _raw_public(key.private_key.public_key()))

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(k.key_id for k in self._keys)

    def to_json(self) -> str:
        return json.dumps({"suite": SUITE_NAME, "keys": [
            {"id": k.key_id, "created": k.created,
             "private_key": _b64(k.private_key.private_bytes(serialization.Encoding.Raw,
                                                             serialization.PrivateFormat.Raw,
                                                             serialization.NoEncryption()))}
            for k in self._keys]}, indent=2)

    def public_json(self) -> str:
        """Public keys only (what check-in may see): ``{"keys": [{"id", "key"}]}``, current last."""
        return json.dumps({"suite": SUITE_NAME, "keys": [
            {"id": k.key_id, "key": _b64(_raw_public(k.private_key.public_key()))} for k in self._keys]}, indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> UploadKeyRing:
        try:
            data = json.loads(text)
            keys = [_Key(str(k["id"]), X25519PrivateKey.from_private_bytes(base64.b64decode(k["private_key"])),
                         float(k.get("created", 0.0))) for k in data["keys"]]
        except (ValueError, KeyError, TypeError, binascii.Error) as error:
            raise ConfigError(f"the upload key ring is not valid JSON key material: {error}",
                              hint="regenerate it with `fedcompute ops rotate-upload-key`") from error
        return cls(keys)

    # -- opening uploads -------------------------------------------------------------------
    def open(self, data: bytes, *, assignment_id: str) -> bytes:
        """The sealed payload of envelope ``data``; InvalidRequestError saying why not."""
        hint = "seal the update to the key named in the task assignment (fedcompute.crypto.hpke.seal_update)"
        try:
            key_id, sealed, associated = _read_envelope(data)
        except (ValueError, KeyError, TypeError, binascii.Error) as error:
            raise InvalidRequestError(f"upload is not an HPKE envelope: {error}", hint=hint) from error
        if key_id not in self._by_id:
            raise UnknownUploadKeyError(f"upload is sealed to unknown key {str(key_id)[:80]!r} "
                                      f"(this server has {', '.join(self.key_ids)})", hint=hint)
        if associated:
            try:
                bound = json.loads(associated).get("assignmentId")
            except (ValueError, AttributeError) as error:
                raise InvalidRequestError("upload associatedData is not a JSON object", hint=hint) from error
            if bound is not None and bound != assignment_id:
                raise InvalidRequestError(f"upload was sealed for assignment {str(bound)[:80]!r}, "
                                          f"not {assignment_id!r}", hint=hint)
        try:
            return _SUITE.decrypt(sealed, self._by_id[key_id].private_key, info=associated)
        except (InvalidTag, ValueError) as error:
            raise InvalidRequestError(f"upload does not decrypt with key {key_id!r} (tampered, or sealed to "
                                      "another key with this id)", hint=hint) from error


def _new_key() -> _Key:
    t = time.time()
    return _Key(f"k{int(t)}-{secrets.token_hex(4)}", X25519PrivateKey.generate(), t)


def public_key_from_json(text: str | bytes) -> PublicUploadKey:
    """The current (last) key of a public key file or a key ring file."""
    data = json.loads(text)
    last = data["keys"][-1]
    if "key" in last:
        return PublicUploadKey(str(last["id"]), base64.b64decode(last["key"]))
    return UploadKeyRing.from_json(text).current


# -- where the keys live ------------------------------------------------------------------

KEYS_ENV = "FEDCOMPUTE_UPLOAD_KEYS"  # the key ring JSON itself (a Secret Manager secret in the cloud)
KEYS_FILE_ENV = "FEDCOMPUTE_UPLOAD_KEYS_FILE"  # or a file holding it (the local stack)
PUBLIC_KEYS_ENV = "FEDCOMPUTE_UPLOAD_PUBLIC_KEYS"
PUBLIC_KEYS_FILE_ENV = "FEDCOMPUTE_UPLOAD_PUBLIC_KEYS_FILE"
KEY_DIR_NAME = "keys"  # under the local stack's state dir
KEYS_FILE = "upload_keys.json"
PUBLIC_KEYS_FILE = "upload_public_keys.json"


class UnknownUploadKeyError(InvalidRequestError):
    """An upload sealed to a key id this key ring does not hold."""


class _Reloading:
    """Re-reads its source when the file changes (rotation takes effect without a restart)."""

    def __init__(self, env: Mapping[str, str], value_env: str, file_env: str, *,
                 check_interval_s: float = 1.0) -> None:
        # Seconds between looks at the file: a rotation takes effect within this, and a busy
        # ingestion or aggregator does not stat the key file once per update.
        self._check_interval_s = check_interval_s
        self._value = env.get(value_env, "")
        self._path = Path(env[file_env]) if env.get(file_env) else None
        self._lock = threading.Lock()
        self._stamp: float | None = None
        self._checked = -float("inf")
        self._text = self._value
        self._cache: tuple[str, Any] | None = None  # (text, what it parsed to)

    @property
    def configured(self) -> bool:
        return bool(self._value or self._path)

    def text(self, *, look: bool = False) -> str:
        """The source's text; ``look``: check the file now, not at the next interval."""
        if self._path is None:
            return self._value
        now = time.monotonic()
        if not look and now - self._checked < self._check_interval_s:
            return self._text
        stamp = self._path.stat().st_mtime_ns
        with self._lock:
            if stamp != self._stamp:
                self._text, self._stamp = self._path.read_text(), stamp
            self._checked = now
            return self._text

    def _parsed(self, parse: Callable[[str], Any], *, look: bool = False) -> Any:
        """``parse`` of the text, computed once per version of the file."""
        text = self.text(look=look)
        if self._cache is None or self._cache[0] is not text:
            self._cache = (text, parse(text))
        return self._cache[1]


class KeyRingSource(_Reloading):
    """The private key ring for ingestion and the aggregator."""

    def __init__(self, env: Mapping[str, str] | None = None, *, check_interval_s: float = 1.0) -> None:
        super().__init__(os.environ if env is None else env, KEYS_ENV, KEYS_FILE_ENV,
                         check_interval_s=check_interval_s)

    def ring(self, *, look: bool = False) -> UploadKeyRing | None:
        return self._parsed(UploadKeyRing.from_json, look=look) if self.configured else None


class PublicKeySource(_Reloading):
    """The current public key for check-in."""

    def __init__(self, env: Mapping[str, str] | None = None, *, check_interval_s: float = 1.0) -> None:
        super().__init__(os.environ if env is None else env, PUBLIC_KEYS_ENV, PUBLIC_KEYS_FILE_ENV,
                         check_interval_s=check_interval_s)

    def current(self) -> PublicUploadKey | None:
        return self._parsed(public_key_from_json) if self.configured else None


def write_key_files(directory: Path, ring: UploadKeyRing) -> tuple[Path, Path]:
    """Write the key ring (mode 0600) and its public half atomically; returns both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = (directory / KEYS_FILE, directory / PUBLIC_KEYS_FILE)
    for path, text, mode in ((paths[0], ring.to_json(), 0o600), (paths[1], ring.public_json(), 0o644)):
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    return paths


def ensure_key_files(directory: Path) -> tuple[Path, Path]:
    """The stack's key files, created with a fresh key ring the first time."""
    private = directory / KEYS_FILE
    if private.is_file() and (directory / PUBLIC_KEYS_FILE).is_file():
        return private, directory / PUBLIC_KEYS_FILE
    return write_key_files(directory, UploadKeyRing.generate())


def rotate_key_files(directory: Path) -> UploadKeyRing:
    """Add a new current key to the stack's key ring (the old ones still decrypt)."""
    private = directory / KEYS_FILE
    ring = UploadKeyRing.from_json(private.read_text()).rotated() if private.is_file() else UploadKeyRing.generate()
    write_key_files(directory, ring)
    return ring


def describe(ring: UploadKeyRing) -> dict[str, Any]:
    return {"suite": SUITE_NAME, "current": ring.current.key_id, "keys": list(ring.key_ids)}


def open_upload(data: bytes, *, assignment_id: str, ring: UploadKeyRing | None, required: bool,
                max_bytes: int) -> bytes:
    """The ClientUpdate bytes of a stored upload: unsealed when it is an envelope.

    A plaintext upload is refused when ``required``; an envelope needs ``ring``. Raises
    :class:`InvalidRequestError` with the reason (the upload is then counted nowhere).
    """
    from fedcompute.learning.tensor_codec import GZIP_MAGIC, gunzip_capped

    inner = gunzip_capped(data, max_bytes=max_bytes) if bytes(data[:2]) == GZIP_MAGIC else data
    if not is_envelope(inner):
        if required:
            raise InvalidRequestError("plaintext upload refused: this server requires HPKE-encrypted updates",
                                      hint="seal the update to the task assignment's upload_encryption key")
        return data
    if ring is None:
        raise InvalidRequestError("upload is HPKE-sealed but this server holds no upload keys",
                                  hint="configure FEDCOMPUTE_UPLOAD_KEYS or FEDCOMPUTE_UPLOAD_KEYS_FILE")
    return ring.open(inner, assignment_id=assignment_id)


def upload_unsealer(keys: KeyRingSource, required: Callable[[], bool], *,
                    max_bytes: int = 64 * 1024 * 1024) -> Callable[[bytes, str], bytes]:
    """``unseal(stored bytes, assignment id)`` for ingestion and the aggregator."""

    def unseal(data: bytes, assignment_id: str) -> bytes:
        try:
            return open_upload(data, assignment_id=assignment_id, ring=keys.ring(), required=required(),
                               max_bytes=max_bytes)
        except UnknownUploadKeyError:
            # Sealed to a key rotated in since this process last looked at the key file:
            # look now before refusing it.
            return open_upload(data, assignment_id=assignment_id, ring=keys.ring(look=True), required=required(),
                               max_bytes=max_bytes)

    return unseal
