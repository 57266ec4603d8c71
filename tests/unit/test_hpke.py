"""HPKE-sealed uploads (issue 13, item 4): seal, open, rotation, tampering, wrong keys, plaintext refusal."""
from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from fedcompute.crypto.hpke import (
    KEEP_KEYS,
    KeyRingSource,
    PublicKeySource,
    PublicUploadKey,
    UploadKeyRing,
    ensure_key_files,
    open_upload,
    rotate_key_files,
    seal_update,
    upload_unsealer,
)
from fedcompute.crypto.hpke import _read_envelope as read_envelope
from fedcompute.errors import InvalidRequestError
from fedcompute.learning.tensor_codec import decode_client_update, encode_client_update

SPEC = [("w", (3,), "float32")]
CAP = 1 << 20


def _update() -> bytes:
    return encode_client_update([("w", np.arange(3, dtype=np.float32))], 5)


def _stored(ring: UploadKeyRing, assignment_id: str = "a-1", payload: bytes | None = None) -> bytes:
    """What a device stores: gzip(envelope(gzip(update)))."""
    return gzip.compress(seal_update(payload or _update(), ring.current, assignment_id=assignment_id))


def test_a_sealed_update_opens_to_the_same_bytes_and_hides_them() -> None:
    ring = UploadKeyRing.generate()
    stored = _stored(ring)
    envelope = json.loads(gzip.decompress(stored))
    assert set(envelope) == {"keyId", "encryptedPayload", "associatedData"} and envelope["keyId"] == ring.current.key_id
    assert _update() not in gzip.decompress(stored)
    opened = open_upload(stored, assignment_id="a-1", ring=ring, required=True, max_bytes=CAP)
    assert opened == _update()
    assert decode_client_update(opened, expected_spec=SPEC).num_examples == 5


@pytest.mark.parametrize("key_id", ["k-1", 'odd "id" \\ é'])
def test_the_envelope_is_the_compact_json_of_its_fields(key_id: str) -> None:
    """Composed without json.dumps of the payload, the envelope keeps the format: compact JSON, fields in order."""
    ring = UploadKeyRing.generate()
    key = PublicUploadKey(key_id, ring.current.public_key)
    envelope = seal_update(_update(), key, assignment_id="a-1")
    fields = json.loads(envelope)
    assert list(fields) == ["keyId", "encryptedPayload", "associatedData"] and fields["keyId"] == key_id
    assert envelope == json.dumps(fields, separators=(",", ":")).encode()
    assert json.loads(base64.b64decode(fields["associatedData"])) == {"assignmentId": "a-1"}


def _relaid(envelope: bytes, layout: str) -> bytes:
    """The same envelope in another JSON layout a client could send."""
    fields = json.loads(envelope)
    if layout == "spaced":
        return json.dumps(fields).encode()
    if layout == "reordered":
        return json.dumps(dict(reversed(list(fields.items()))), separators=(",", ":")).encode()
    if layout == "escaped slashes":
        return envelope.replace(b"/", b"\\/")
    if layout == "escaped key id":
        return envelope.replace(b'{"keyId":"k', b'{"keyId":"\\u006b', 1)
    if layout == "surrounding whitespace":
        return b" \n" + envelope + b"\r\n\t "
    assert layout == "compact"
    return envelope


@pytest.mark.parametrize("layout", ["compact", "spaced", "reordered", "escaped slashes", "escaped key id",
                                    "surrounding whitespace"])
def test_an_envelope_in_any_json_layout_opens_to_the_same_update(layout: str) -> None:
    """The compact layout is read without a JSON parse of the payload; every other layout by the JSON parser."""
    ring = UploadKeyRing.generate()
    envelope = seal_update(_update(), ring.current, assignment_id="a-1")
    # The ciphertext is fresh on every seal; about one payload in eight of this size has no "/" to escape.
    while layout == "escaped slashes" and b"/" not in envelope:
        envelope = seal_update(_update(), ring.current, assignment_id="a-1")
    assert ring.current.key_id.startswith("k")
    relaid = _relaid(envelope, layout)
    assert relaid != envelope or layout == "compact"
    assert open_upload(relaid, assignment_id="a-1", ring=ring, required=True, max_bytes=CAP) == _update()


def _reference_read(data: bytes) -> tuple[str, bytes, bytes]:
    fields = json.loads(data)
    if not isinstance(fields["keyId"], str):
        raise TypeError("keyId")
    return (fields["keyId"], base64.b64decode(fields["encryptedPayload"], validate=True),
            base64.b64decode(fields.get("associatedData", ""), validate=True))


def _malformed(envelope: bytes) -> list[bytes]:
    payload_at = envelope.index(b'"encryptedPayload":"') + len(b'"encryptedPayload":"')
    return [
        envelope[:-1], envelope[:-2] + b"}", envelope + b"x", envelope[:-1] + b',"keyId":"other"}',
        envelope[:payload_at] + b'"' + envelope[payload_at:], envelope[:payload_at] + b"*" + envelope[payload_at + 1:],
        envelope[:payload_at] + b"\\" + envelope[payload_at + 1:], envelope[:payload_at] + b"\n" + envelope[payload_at:],
        envelope.replace(b'{"keyId":"', b'{"keyId":"\x01', 1), envelope.replace(b'{"keyId":"', b'{"keyId":"\\"', 1),
        envelope.replace(b'{"keyId":"', b'{"keyId":"\xff', 1), envelope.replace(b'","associatedData":"', b'"}', 1),
        envelope[:payload_at] + envelope[payload_at + 1:], b'{"keyId":"k"}', b"[]", b"",
        envelope.replace(b'"}', b'=="}'), envelope.replace(b'"}', b'"}\x0c'),
    ]


def test_the_envelope_reader_agrees_with_the_json_parser_on_malformed_envelopes() -> None:
    """Hostile bytes: the fast reading never accepts what the JSON parser would refuse, nor reads it differently."""
    ring = UploadKeyRing.generate()
    envelope = seal_update(_update(), ring.current, assignment_id="a-1")
    for data in _malformed(envelope):
        try:
            expected: object = _reference_read(data)
        except (ValueError, KeyError, TypeError) as error:  # binascii.Error is a ValueError
            expected = type(error)
        try:
            got: object = read_envelope(data)
        except (ValueError, KeyError, TypeError) as error:
            got = type(error)
        assert (got == expected) if isinstance(expected, tuple) else not isinstance(got, tuple), data[:60]


def test_rotation_keeps_in_flight_uploads_decryptable(tmp_path: Path) -> None:
    private, public = ensure_key_files(tmp_path)
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    keys = KeyRingSource({"FEDCOMPUTE_UPLOAD_KEYS_FILE": str(private)}, check_interval_s=0)
    handed_out = PublicKeySource({"FEDCOMPUTE_UPLOAD_PUBLIC_KEYS_FILE": str(public)}, check_interval_s=0)
    before = handed_out.current()
    assert before is not None
    in_flight = gzip.compress(seal_update(_update(), before, assignment_id="a-1"))
    rotate_key_files(tmp_path)
    after = handed_out.current()
    assert after is not None and after.key_id != before.key_id  # new check-ins get the new key
    unseal = upload_unsealer(keys, lambda: True)
    assert unseal(in_flight, "a-1") == _update()  # sealed before the rotation, opened after it
    for _ in range(KEEP_KEYS + 1):
        rotate_key_files(tmp_path)
    with pytest.raises(InvalidRequestError, match="unknown key"):
        unseal(in_flight, "a-1")  # retired after KEEP_KEYS rotations


def test_key_files_are_looked_at_once_per_interval_not_once_per_upload(tmp_path: Path) -> None:
    private, public = ensure_key_files(tmp_path)
    handed_out = PublicKeySource({"FEDCOMPUTE_UPLOAD_PUBLIC_KEYS_FILE": str(public)}, check_interval_s=3600)
    keys = KeyRingSource({"FEDCOMPUTE_UPLOAD_KEYS_FILE": str(private)}, check_interval_s=3600)
    before, ring = handed_out.current(), keys.ring()
    assert before is not None and ring is not None
    rotate_key_files(tmp_path)
    # Within the interval the sources serve what they read (no stat, no parse per call) ...
    assert handed_out.current() is before and keys.ring() is ring
    # An upload sealed to the new key (handed out by another process) still opens at once.
    newest = PublicKeySource({"FEDCOMPUTE_UPLOAD_PUBLIC_KEYS_FILE": str(public)}, check_interval_s=0).current()
    assert newest is not None
    unseal = upload_unsealer(keys, lambda: True)
    assert unseal(gzip.compress(seal_update(_update(), newest, assignment_id="a-2")), "a-2") == _update()
    # ... and a source that looks every time sees the rotation at once.
    fresh = PublicKeySource({"FEDCOMPUTE_UPLOAD_PUBLIC_KEYS_FILE": str(public)}, check_interval_s=0)
    assert fresh.current() is not None and fresh.current().key_id != before.key_id  # type: ignore[union-attr]


def test_an_upload_sealed_to_another_servers_key_is_refused() -> None:
    ours, theirs = UploadKeyRing.generate(), UploadKeyRing.generate()
    with pytest.raises(InvalidRequestError, match="unknown key"):
        open_upload(_stored(theirs), assignment_id="a-1", ring=ours, required=True, max_bytes=CAP)


def test_an_upload_sealed_to_another_key_under_our_key_id_is_refused() -> None:
    ours, theirs = UploadKeyRing.generate(), UploadKeyRing.generate()
    envelope = json.loads(seal_update(_update(), theirs.current, assignment_id="a-1"))
    envelope["keyId"] = ours.current.key_id
    with pytest.raises(InvalidRequestError, match="does not decrypt"):
        open_upload(json.dumps(envelope).encode(), assignment_id="a-1", ring=ours, required=True, max_bytes=CAP)


@pytest.mark.parametrize("part", ["ciphertext", "enc", "associatedData"])
def test_a_tampered_upload_is_refused(part: str) -> None:
    ring = UploadKeyRing.generate()
    envelope = json.loads(seal_update(_update(), ring.current, assignment_id="a-1"))
    if part == "associatedData":
        envelope["associatedData"] = base64.b64encode(b'{"assignmentId":"a-1","x":1}').decode()
    else:
        sealed = bytearray(base64.b64decode(envelope["encryptedPayload"]))
        sealed[40 if part == "ciphertext" else 3] ^= 1
        envelope["encryptedPayload"] = base64.b64encode(bytes(sealed)).decode()
    with pytest.raises(InvalidRequestError, match="does not decrypt"):
        open_upload(json.dumps(envelope).encode(), assignment_id="a-1", ring=ring, required=True, max_bytes=CAP)


def test_a_sealed_update_replayed_into_another_assignment_is_refused() -> None:
    ring = UploadKeyRing.generate()
    with pytest.raises(InvalidRequestError, match="sealed for assignment"):
        open_upload(_stored(ring, "a-1"), assignment_id="a-2", ring=ring, required=True, max_bytes=CAP)


def test_plaintext_is_refused_when_encryption_is_required_and_passed_through_otherwise() -> None:
    ring, plain = UploadKeyRing.generate(), gzip.compress(_update())
    with pytest.raises(InvalidRequestError, match="plaintext upload refused"):
        open_upload(plain, assignment_id="a-1", ring=ring, required=True, max_bytes=CAP)
    assert open_upload(plain, assignment_id="a-1", ring=ring, required=False, max_bytes=CAP) == plain


def test_an_envelope_bomb_is_capped_before_decryption() -> None:
    ring = UploadKeyRing.generate()
    bomb = gzip.compress(b"{" + b" " * (4 * CAP))
    with pytest.raises(InvalidRequestError, match="more than"):
        open_upload(bomb, assignment_id="a-1", ring=ring, required=True, max_bytes=CAP)


def test_ingestion_counts_sealed_uploads_and_counts_tampered_or_wrong_key_ones_nowhere() -> None:
    import random

    from fedcompute.memory import InMemoryBlobStore, InMemoryRoundEvents, InMemoryTaskStore
    from fedcompute.services import assignment as svc
    from fedcompute.services import ingestion
    from fedcompute.settings import Settings
    from fedcompute.tasks.records import (
        AssignmentStatus,
        ReportedResult,
        RoundKey,
        RoundRecord,
        RoundStatus,
        TaskKind,
        TaskRecord,
        TaskStatus,
    )

    settings, store, blobs, events = Settings(), InMemoryTaskStore(), InMemoryBlobStore(), InMemoryRoundEvents()
    ring, stranger = UploadKeyRing.generate(), UploadKeyRing.generate()
    task = store.create_task("p", lambda tid: TaskRecord(population="p", task_id=tid, kind=TaskKind.TRAINING,
                                                        status=TaskStatus.OPEN, report_goal=2, over_selection_rate=1.0,
                                                        total_rounds=1, current_round=1))
    store.create_round(RoundRecord(population="p", task_id=task.task_id, round_number=1,
                                           status=RoundStatus.COLLECTING, report_goal=2, max_assignments=4))
    key = RoundKey("p", task.task_id, 1)
    unseal = upload_unsealer(KeyRingSource({"FEDCOMPUTE_UPLOAD_KEYS": ring.to_json()}), lambda: True)

    def device(seal: str) -> ingestion.IngestionResult:
        a = svc.create_task_assignment(store, blobs, settings, svc.CheckIn("p", "1"), rng=random.Random())
        assert isinstance(a, svc.Assignment)
        instruction = svc.report_result(store, blobs, settings, key, a.assignment_id, ReportedResult.COMPLETED)
        assert isinstance(instruction, svc.UploadInstruction)
        if seal == "tampered":
            envelope = json.loads(seal_update(_update(), ring.current, assignment_id=a.assignment_id))
            sealed = bytearray(base64.b64decode(envelope["encryptedPayload"]))
            sealed[-1] ^= 1  # one bit of the Poly1305 tag
            envelope["encryptedPayload"] = base64.b64encode(bytes(sealed)).decode()
            body = gzip.compress(json.dumps(envelope).encode())
        else:
            body = {"ours": _stored(ring, a.assignment_id), "stranger": _stored(stranger, a.assignment_id),
                    "plain": gzip.compress(_update())}[seal]
        blobs.complete_upload(instruction.upload_location, body)
        return ingestion.ingest_upload(store, blobs, events, settings,
                                       ingestion.ObjectFinalized(f"ev-{a.assignment_id}", settings.gradient_bucket,
                                                                 instruction.object_name, len(body)),
                                       validate=lambda data, t: decode_client_update(data, expected_spec=SPEC) and None,
                                       unseal=unseal)

    rejected = [device(kind) for kind in ("stranger", "plain", "tampered")]
    assert [r.outcome for r in rejected] == [ingestion.OUTCOME_INVALID] * 3
    assert "unknown key" in rejected[0].reason and "plaintext" in rejected[1].reason
    assert store.count_assignments(key, AssignmentStatus.UPLOAD_COMPLETED) == 0  # counted nowhere
    accepted = [device("ours"), device("ours")]
    assert [r.outcome for r in accepted] == [ingestion.OUTCOME_ACCEPTED] * 2 and accepted[-1].round_closed
    assert sorted(store.accepted_ids(key)) == sorted(
        a.assignment_id for a in store.list_assignments(key, AssignmentStatus.UPLOAD_COMPLETED))
