"""elkeid_agent.wire against the bytes of the real Go agent and Go plugin library.

Fixtures: tests/data/elkeid-go (see its README). Decoding is checked with
python-protobuf (grpc_pb2), never with our own decoder.

Every test runs twice: with the frame scan as shipped (compiled by mypyc, proving records
plain) and as Python source (no proof: the batch parse validates), the fallback.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elkeid_agent import framescan, wire
from elkeid_agent._proto import grpc_pb2
from elkeid_agent._proto.shape_pb2 import RecordTop
from elkeid_agent.wire import (
    DEFAULT_MAX_FRAME,
    FrameDecoder,
    FrameTooLarge,
    Header,
    WireError,
    check_record,
    decode_varint,
    encode_record,
    encode_task,
    encode_varint,
    record_frame,
    record_header,
    splice_records,
    spliced_size,
    task_frame,
)

FIXTURES = Path(__file__).resolve().parent / "data" / "elkeid-go"

PLUGIN_STREAMS = ("go-plugin-frames", "go-plugin-edge-frames")

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
FIELDS = st.dictionaries(TEXT, TEXT, max_size=8)


def _source_framescan() -> Any:
    """elkeid_agent/framescan.py run as Python, whether or not a compiled module is there."""
    source = Path(wire.__file__).with_name("framescan.py")
    spec = importlib.util.spec_from_file_location("framescan_source", source)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SOURCE = _source_framescan()


@pytest.fixture(autouse=True, params=["compiled", "source"])
def scan_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "compiled":
        assert framescan.compiled(), (
            "elkeid_agent/framescan.py is not compiled: `make setup` runs tools/compile_hot.py, "
            "which needs a C compiler (gcc) and the Python headers"
        )
        assert wire._prove
    else:
        monkeypatch.setattr(wire, "_scan", SOURCE.scan)
        monkeypatch.setattr(wire, "_prove", False)
    return str(request.param)


@cache
def _bin(name: str) -> bytes:
    return (FIXTURES / f"{name}.bin").read_bytes()


@cache
def _jsonl(name: str) -> tuple[dict[str, Any], ...]:
    lines = (FIXTURES / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return tuple(json.loads(line) for line in lines if line.strip())


def _frames(data: bytes) -> Iterator[bytes]:
    """The bodies of `u32 LE length + body` frames (the fixture file framing)."""
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack_from("<I", data, pos)
        yield data[pos + 4 : pos + 4 + length]
        pos += 4 + length
    assert pos == len(data)


def _feed_in_chunks(decoder: FrameDecoder, data: bytes, sizes: list[int]) -> list[bytes]:
    out: list[bytes] = []
    pos = 0
    i = 0
    while pos < len(data):
        step = sizes[i % len(sizes)]
        i += 1
        out += decoder.feed(data[pos : pos + step])
        pos += step
    return out


def _top_level_fields(buf: bytes) -> list[tuple[int, int, bytes | int]]:
    """(field number, wire type, value) of each top-level field, in wire order."""
    out: list[tuple[int, int, bytes | int]] = []
    pos = 0
    while pos < len(buf):
        key, pos = decode_varint(buf, pos, len(buf))
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = decode_varint(buf, pos, len(buf))
            out.append((number, wire_type, value))
        elif wire_type == 2:
            length, pos = decode_varint(buf, pos, len(buf))
            out.append((number, wire_type, buf[pos : pos + length]))
            pos += length
        else:
            raise AssertionError(f"unexpected wire type {wire_type}")
    return out


def _field_order(buf: bytes) -> list[int]:
    """Field numbers in wire order, runs of one repeated field collapsed (the README's rule)."""
    order: list[int] = []
    for number, _, _ in _top_level_fields(buf):
        if not order or order[-1] != number:
            order.append(number)
    return order


def _check_against_description(frame: bytes, expected: dict[str, Any]) -> None:
    record = grpc_pb2.Record.FromString(frame)
    assert len(frame) == expected["frame_len"]
    assert record.data_type == expected["data_type"]
    assert record.timestamp == expected["timestamp"]
    assert dict(record.data.fields) == expected["fields"]
    assert record.HasField("data") == (expected["payload_len"] is not None)
    assert record_header(frame) == (expected["data_type"], expected["timestamp"])
    assert [n for n, _, _ in _top_level_fields(frame)] == expected["wire_field_numbers"]


# --- plugin record frames ---------------------------------------------------------------------


@pytest.mark.parametrize("name", PLUGIN_STREAMS)
def test_fixture_frames_whole(name: str) -> None:
    decoder = FrameDecoder()
    frames = decoder.feed(_bin(name))
    expected = _jsonl(name)
    assert len(frames) == len(expected)
    assert decoder.frames == len(expected)
    assert decoder.malformed == 0
    assert decoder.pending == 0
    data = _bin(name)
    for frame, want in zip(frames, expected, strict=True):
        offset = want["offset"]
        assert frame == data[offset + 4 : offset + 4 + want["frame_len"]]
        _check_against_description(frame, want)


@pytest.mark.parametrize("name", PLUGIN_STREAMS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(1, 70_000), min_size=1, max_size=12))
def test_fixture_frames_in_random_chunks(name: str, sizes: list[int]) -> None:
    decoder = FrameDecoder()
    frames = _feed_in_chunks(decoder, _bin(name), sizes)
    expected = _jsonl(name)
    assert decoder.malformed == 0
    assert decoder.pending == 0
    assert len(frames) == len(expected)
    for frame, want in zip(frames, expected, strict=True):
        _check_against_description(frame, want)


def test_fixture_frames_one_byte_at_a_time() -> None:
    decoder = FrameDecoder()
    frames = _feed_in_chunks(decoder, _bin("go-plugin-frames"), [1])
    assert len(frames) == 401
    assert [grpc_pb2.Record.FromString(f).data.fields["seq"] for f in frames] == [
        str(i) for i in range(401)
    ]


def test_edge_cases_are_all_present() -> None:
    """The cases the brief names are really in the edge fixture, and each is accepted."""
    edge = _jsonl("go-plugin-edge-frames")
    frames = FrameDecoder().feed(_bin("go-plugin-edge-frames"))
    by_label = {want["label"]: frame for want, frame in zip(edge, frames, strict=True)}
    assert by_label["completely empty Record{} (frame_len 0)"] == b""
    assert record_header(by_label["timestamp 0 (field 2 omitted)"]) == (9999, 0)
    assert record_header(by_label["data_type 0 (field 1 omitted)"]) == (0, 1764168000)
    assert record_header(by_label["negative data_type -1 (10-byte varint)"]) == (-1, 1764168000)
    data_nil = grpc_pb2.Record.FromString(by_label["Data nil (field 3 omitted)"])
    assert data_nil.HasField("data") is False
    big = next(f for f in frames if len(f) > 200 * 1024)
    assert len(grpc_pb2.Record.FromString(big).data.fields) == 61
    assert record_header(frames[14]) == (2**31 - 1, 2**63 - 1)


def test_edge_frame_hex_matches() -> None:
    for want in _jsonl("go-plugin-edge-frames"):
        if "hex" in want:
            frame = bytes.fromhex(want["hex"])
            body = frame[4:]
            assert record_frame(body) == frame
            assert FrameDecoder().feed(frame) == [body]


# --- encoders ---------------------------------------------------------------------------------


def test_task_frames_byte_identical_to_go_agent() -> None:
    data = _bin("go-agent-task-frames")
    tasks = _jsonl("go-agent-task-frames")
    assert len(tasks) == 5
    ours = b"".join(
        task_frame(t["data_type"], t["object_name"], t["data"], t["token"]) for t in tasks
    )
    assert ours == data
    for t in tasks:
        assert task_frame(t["data_type"], t["object_name"], t["data"], t["token"]).hex() == t["hex"]
        expected = grpc_pb2.Task(
            data_type=t["data_type"], object_name=t["object_name"], data=t["data"], token=t["token"]
        )
        assert grpc_pb2.Task.FromString(
            encode_task(t["data_type"], t["object_name"], t["data"], t["token"])
        ) == expected


def test_encode_record_matches_go_edge_frames() -> None:
    """Deterministic Go frames (single field or none) are reproduced byte for byte."""
    checked = 0
    for want, frame in zip(
        _jsonl("go-plugin-edge-frames"), _frames(_bin("go-plugin-edge-frames")), strict=True
    ):
        if want["payload_len"] is None or len(want["fields"]) > 1:
            continue  # Data nil and Record{} are not what encode_record makes; maps reorder
        assert encode_record(want["data_type"], want["timestamp"], want["fields"]) == frame
        checked += 1
    assert checked == 15


@settings(max_examples=300)
@given(data_type=INT32, timestamp=INT64, key=TEXT, value=TEXT)
def test_encode_record_equals_protobuf_single_field(
    data_type: int, timestamp: int, key: str, value: str
) -> None:
    expected = grpc_pb2.Record(data_type=data_type, timestamp=timestamp)
    expected.data.fields[key] = value
    ours = encode_record(data_type, timestamp, {key: value})
    assert ours == expected.SerializeToString()
    assert grpc_pb2.Record.FromString(ours) == expected


@settings(max_examples=200)
@given(data_type=INT32, timestamp=INT64)
def test_encode_record_empty_payload_equals_protobuf(data_type: int, timestamp: int) -> None:
    expected = grpc_pb2.Record(data_type=data_type, timestamp=timestamp)
    expected.data.SetInParent()
    assert encode_record(data_type, timestamp, {}) == expected.SerializeToString()


@given(value=st.integers(0, 2**64 - 1))
def test_varint_round_trip(value: int) -> None:
    encoded = encode_varint(value)
    assert decode_varint(encoded, 0, len(encoded)) == (value, len(encoded))


@given(value=st.integers(-(2**63), -1))
def test_negative_varints_are_ten_bytes(value: int) -> None:
    assert len(encode_varint(value)) == 10


# --- splice -----------------------------------------------------------------------------------

HEADERS = st.builds(
    Header,
    agent_id=TEXT,
    intranet_ipv4=st.lists(TEXT, max_size=5),
    extranet_ipv4=st.lists(TEXT, max_size=5),
    intranet_ipv6=st.lists(TEXT, max_size=5),
    extranet_ipv6=st.lists(TEXT, max_size=5),
    hostname=TEXT,
    version=TEXT,
    product=TEXT,
)


@st.composite
def records(draw: st.DrawFn) -> grpc_pb2.Record:
    record = grpc_pb2.Record(data_type=draw(INT32), timestamp=draw(INT64))
    fields = draw(st.one_of(st.none(), FIELDS))
    if fields is not None:
        record.data.SetInParent()
        record.data.fields.update(fields)
    return record


@settings(max_examples=300)
@given(recs=st.lists(records(), max_size=20), header=HEADERS)
def test_splice_decodes_as_packaged_data(recs: list[grpc_pb2.Record], header: Header) -> None:
    encoded = [r.SerializeToString() for r in recs]
    for raw in encoded:
        check_record(raw)
        assert record_header(raw) == (
            grpc_pb2.Record.FromString(raw).data_type,
            grpc_pb2.Record.FromString(raw).timestamp,
        )
    message = splice_records(encoded, header.encode())
    # spliced_size is the budget the buffer charges: never below the real size.
    assert len(message) <= sum(map(spliced_size, encoded)) + len(header.encode())
    decoded = grpc_pb2.PackagedData.FromString(message)
    assert len(decoded.records) == len(recs)
    for got, rec in zip(decoded.records, recs, strict=True):
        assert got.data_type == rec.data_type
        assert got.timestamp == rec.timestamp
        assert got.data == rec.data.SerializeToString()
        assert grpc_pb2.Payload.FromString(got.data) == rec.data
    assert decoded.agent_id == header.agent_id
    assert list(decoded.intranet_ipv4) == list(header.intranet_ipv4)
    assert list(decoded.extranet_ipv4) == list(header.extranet_ipv4)
    assert list(decoded.intranet_ipv6) == list(header.intranet_ipv6)
    assert list(decoded.extranet_ipv6) == list(header.extranet_ipv6)
    assert decoded.hostname == header.hostname
    assert decoded.version == header.version
    assert decoded.product == header.product
    # Records first, then the header fields in ascending order, empty ones absent.
    order = _field_order(message)
    if recs:
        assert order[0] == 1
    assert order == sorted(set(order))
    assert (2 in order) == bool(header.agent_id)
    assert (3 in order) == bool(header.intranet_ipv4)
    assert (6 in order) == bool(header.extranet_ipv6)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21])
def test_spliced_size_bounds_splice(size: int) -> None:
    """An upper bound of the real size (one byte over for records under 128 bytes)."""
    record = b"\x00" * size
    real = len(splice_records([record], b""))
    assert real <= spliced_size(record) <= real + 1


def _fixture_header(message: grpc_pb2.PackagedData) -> Header:
    return Header(
        agent_id=message.agent_id,
        intranet_ipv4=list(message.intranet_ipv4),
        extranet_ipv4=list(message.extranet_ipv4),
        intranet_ipv6=list(message.intranet_ipv6),
        extranet_ipv6=list(message.extranet_ipv6),
        hostname=message.hostname,
        version=message.version,
        product=message.product,
    )


@pytest.mark.parametrize("name", ["go-agent-packageddata", "go-agent-edge-packageddata"])
def test_packaged_data_structure_matches_go_agent(name: str) -> None:
    """Rebuild each Go PackagedData from its records and header: same structure (and bytes)."""
    messages = list(_frames(_bin(name)))
    described = _jsonl(name)
    assert len(messages) == len(described)
    for raw, want in zip(messages, described, strict=True):
        go = grpc_pb2.PackagedData.FromString(raw)
        assert len(go.records) == want["record_count"]
        assert _field_order(raw) == want["wire_field_order"]
        record_bytes = [v for n, _, v in _top_level_fields(raw) if n == 1]
        assert all(isinstance(r, bytes) for r in record_bytes)
        header = _fixture_header(go).encode()
        ours = splice_records([r for r in record_bytes if isinstance(r, bytes)], header)
        assert _field_order(ours) == want["wire_field_order"]
        assert grpc_pb2.PackagedData.FromString(ours) == go
        assert ours == raw


def test_go_plugin_frames_splice_into_go_agent_messages() -> None:
    """The 401 plugin frames, spliced verbatim, are what the Go agent put in messages 1-10."""
    frames = FrameDecoder().feed(_bin("go-plugin-frames"))
    go_messages = list(_frames(_bin("go-agent-packageddata")))[1:11]
    go_records = [
        grpc_pb2.PackagedData.FromString(m).records for m in go_messages
    ]
    got = [
        (r.data_type, dict(grpc_pb2.Payload.FromString(r.data).fields)["seq"])
        for batch in go_records
        for r in batch
    ]
    assert [seq for _, seq in got] == [str(i) for i in range(401)]
    header = _fixture_header(grpc_pb2.PackagedData.FromString(go_messages[0])).encode()
    ours = grpc_pb2.PackagedData.FromString(splice_records(frames, header))
    assert [
        (r.data_type, dict(grpc_pb2.Payload.FromString(r.data).fields)["seq"])
        for r in ours.records
    ] == got


# --- validation -------------------------------------------------------------------------------


@settings(max_examples=500)
@given(data=st.binary(max_size=300), sizes=st.lists(st.integers(1, 64), min_size=1, max_size=8))
def test_random_bytes_only_raise_wire_errors(data: bytes, sizes: list[int]) -> None:
    decoder = FrameDecoder(max_frame=1024)
    try:
        frames = _feed_in_chunks(decoder, data, sizes)
    except WireError:
        return
    for frame in frames:
        check_record(frame)  # what the decoder passes must pass the strict check
        grpc_pb2.EncodedRecord.FromString(frame)  # and the server's decoder


@settings(max_examples=500)
@given(data=st.binary(max_size=200))
def test_check_record_random_bytes(data: bytes) -> None:
    try:
        check_record(data)
    except WireError:
        return
    record_header(data)  # a valid record always has a header


@settings(max_examples=300)
@given(bodies=st.lists(st.binary(max_size=60), max_size=10))
def test_random_frames_valid_or_counted(bodies: list[bytes]) -> None:
    """Every framed body is either passed through verbatim or counted malformed."""
    decoder = FrameDecoder()
    out = decoder.feed(b"".join(map(record_frame, bodies)))
    assert len(out) + decoder.malformed == len(bodies)
    valid = []
    for body in bodies:
        try:
            check_record(body)
        except WireError:
            continue
        valid.append(body)
    assert out == valid


def test_frame_length_beyond_cap_raises() -> None:
    decoder = FrameDecoder(max_frame=100)
    assert decoder.feed(record_frame(b"\x08\x01" * 50)) == [b"\x08\x01" * 50]
    with pytest.raises(FrameTooLarge):
        decoder.feed(struct.pack("<I", 101))
    with pytest.raises(FrameTooLarge):
        FrameDecoder().feed(struct.pack("<I", DEFAULT_MAX_FRAME + 1))


def test_frame_length_at_cap_waits_for_the_body() -> None:
    decoder = FrameDecoder(max_frame=100)
    assert decoder.feed(struct.pack("<I", 100) + b"\x00" * 50) == []
    assert decoder.pending == 54


GOOD = bytes.fromhex("088f4e10c0a29cc9061a080a060a016b120176")  # 9999, ts, {k: v}


@pytest.mark.parametrize("sizes", [[1], [7, 3], [30, 200], [10_000]])
def test_long_frames_across_reads_are_spliced_on_their_own(
    monkeypatch: pytest.MonkeyPatch, sizes: list[int]
) -> None:
    # Frames of LONG_FRAME bytes and more that span reads take `_finish_held`'s path.
    monkeypatch.setattr(wire, "LONG_FRAME", 12)
    unknown = GOOD + b"\x20\x05"  # valid, not plain: field 4, a varint
    bad = b"\x08\x01\x1a\x7f" + b"x" * 10  # data runs past the end
    bodies = [GOOD, b"\x08\x01", bad, unknown, GOOD * 3, bad]
    decoder = FrameDecoder()
    out = _feed_in_chunks(decoder, b"".join(map(record_frame, bodies)), sizes)
    assert out == [GOOD, b"\x08\x01", unknown, GOOD * 3]
    assert decoder.malformed == 2
    assert decoder.frames == 4
    assert decoder.pending == 0


def test_a_long_frame_completed_before_a_bad_length_is_delivered() -> None:
    long = b"\x08\x01\x1a\x80\x80\x40" + b"p" * (1 << 20)
    frame = record_frame(long)
    decoder = FrameDecoder()
    assert decoder.feed(frame[:1000]) == []
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(frame[1000:] + record_frame(GOOD) + struct.pack("<I", DEFAULT_MAX_FRAME + 1))
    assert list(info.value.frames) == [long, GOOD]

MALFORMED = {
    "data_type as LEN": bytes.fromhex("0a0101") + GOOD,
    "timestamp as fixed64": GOOD + bytes.fromhex("11") + b"\x00" * 8,
    "data as varint": bytes.fromhex("088f4e1801"),
    "truncated varint": bytes.fromhex("08ff"),
    "data runs past the end": bytes.fromhex("1a05") + b"\x0a",
    "a stray byte after the data": bytes.fromhex("1a090a070a016b1501020304"),
    "field number 0": bytes.fromhex("0001"),
    "group wire type": bytes.fromhex("0b"),
}

# The payload is opaque bytes, as in the server's EncodedRecord: whatever it holds, both paths
# forward it (the server decodes a payload only when it needs it, per record).
TOLERATED_IN_PAYLOAD = {
    "map entry longer than it says": bytes.fromhex("1a080a070a016b150102"),
    "payload that is not a Payload": bytes.fromhex("1a03ffffff"),
    "Payload.fields as varint": bytes.fromhex("1a020801"),
    "map key as varint": bytes.fromhex("1a070a0508011201 76".replace(" ", "")),
    "map value as fixed32": bytes.fromhex("1a0a0a080a016b1501020304"),
    "group in a map entry": bytes.fromhex("1a090a070a016b1b08011c"),
}


@pytest.mark.parametrize("case", sorted(TOLERATED_IN_PAYLOAD))
def test_mistyped_payload_fields_pass_on_both_paths(case: str) -> None:
    body = TOLERATED_IN_PAYLOAD[case]
    check_record(body)
    alone = FrameDecoder()
    assert alone.feed(record_frame(body)) == [body]
    mixed = FrameDecoder()
    odd = UNKNOWN_OK["unknown varint field 4"]  # sends the batch down the strict path
    assert mixed.feed(record_frame(odd) + record_frame(body)) == [odd, body]
    assert alone.malformed == mixed.malformed == 0


UNKNOWN_OK = {
    "unknown varint field 4": GOOD + bytes.fromhex("2001"),
    "unknown fixed64 field 15": GOOD + bytes.fromhex("79") + b"\x01" * 8,
    "unknown fixed32 field 5": bytes.fromhex("2d01020304") + GOOD,
    "unknown LEN field 100": GOOD + bytes.fromhex("a20603616263"),
    "unknown field in Payload": bytes.fromhex("1a0a0a060a016b1201761001"),
    "unknown field in map entry": bytes.fromhex("1a0a0a080a016b1201761801"),
    "fields out of order": bytes.fromhex("1a080a060a016b120176") + bytes.fromhex("088f4e"),
    "non-canonical varint": bytes.fromhex("088f ce 80 00".replace(" ", "")),
    "repeated data_type": bytes.fromhex("08010802"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_frames_are_counted(case: str) -> None:
    body = MALFORMED[case]
    with pytest.raises(WireError):
        check_record(body)
    decoder = FrameDecoder()
    stream = record_frame(GOOD) + record_frame(body) + record_frame(GOOD)
    assert decoder.feed(stream) == [GOOD, GOOD]
    assert decoder.malformed == 1
    assert decoder.frames == 2


@pytest.mark.parametrize("case", sorted(UNKNOWN_OK))
def test_unknown_fields_pass(case: str) -> None:
    body = UNKNOWN_OK[case]
    check_record(body)
    grpc_pb2.Record.FromString(body)  # protobuf agrees it is a Record
    decoder = FrameDecoder()
    assert decoder.feed(record_frame(GOOD) + record_frame(body)) == [GOOD, body]
    assert decoder.malformed == 0


def test_unknown_payload_field_case_is_well_formed() -> None:
    # The Payload of UNKNOWN_OK["unknown field in Payload"] carries {k: v} and a field 2.
    record = grpc_pb2.Record.FromString(UNKNOWN_OK["unknown field in Payload"])
    assert dict(record.data.fields) == {"k": "v"}


def test_canonical_fast_path_and_slow_path_agree() -> None:
    """A batch mixing canonical and unknown-field frames loses nothing valid."""
    bodies = [GOOD, UNKNOWN_OK["unknown varint field 4"], GOOD, MALFORMED["data as varint"]]
    decoder = FrameDecoder()
    assert decoder.feed(b"".join(map(record_frame, bodies))) == bodies[:3]
    assert decoder.malformed == 1


@st.composite
def mutated_frames(draw: st.DrawFn) -> list[bytes]:
    """Valid Record encodings, some with one byte changed, cut short or extended."""
    bodies = [r.SerializeToString() for r in draw(st.lists(records(), min_size=1, max_size=8))]
    out = []
    for original in bodies:
        body = original
        how = draw(st.sampled_from(["keep", "flip", "cut", "append"]))
        if how == "flip" and body:
            i = draw(st.integers(0, len(body) - 1))
            body = body[:i] + bytes([draw(st.integers(0, 255))]) + body[i + 1 :]
        elif how == "cut" and body:
            body = body[: draw(st.integers(0, len(body) - 1))]
        elif how == "append":
            body += draw(st.binary(min_size=1, max_size=6))
        out.append(body)
    return out


@settings(max_examples=1000)
@given(bodies=mutated_frames())
def test_fast_path_agrees_with_strict_check(bodies: list[bytes]) -> None:
    """Batch validation (one protobuf parse) keeps exactly what the strict check accepts."""
    decoder = FrameDecoder()
    out = decoder.feed(b"".join(map(record_frame, bodies)))
    strict = []
    for body in bodies:
        try:
            check_record(body)
        except WireError as exc:
            if "overflows 64 bits" in str(exc):
                # Known divergence, see test_overflowing_varint_dropped_whatever_the_neighbours.
                return
            continue
        strict.append(body)
    assert out == strict
    assert decoder.malformed == len(bodies) - len(strict)
    for body in out:
        # the server's decoder reads what we forward
        RecordTop.FromString(body)


OVERFLOW = b"\x08" + b"\xff" * 9 + b"\x02"  # data_type: a 10-byte varint past 64 bits


def test_overflowing_varint_handled_alike_whatever_the_neighbours() -> None:
    # upb and gogo drop the bits past 64; so do we, on both the batch and the strict path.
    check_record(OVERFLOW)
    with_odd_neighbour = FrameDecoder()
    odd = UNKNOWN_OK["unknown varint field 4"]  # sends the batch down the strict path
    assert with_odd_neighbour.feed(record_frame(odd) + record_frame(OVERFLOW)) == [odd, OVERFLOW]
    assert with_odd_neighbour.malformed == 0
    alone = FrameDecoder()
    assert alone.feed(record_frame(OVERFLOW)) == [OVERFLOW]
    assert alone.malformed == 0


@settings(max_examples=2000)
@given(bodies=mutated_frames(), junk=st.lists(st.binary(max_size=12), max_size=3))
def test_plain_proof_implies_the_strict_check(bodies: list[bytes], junk: list[bytes]) -> None:
    """`plain_record` only ever says True for what `check_record` accepts, compiled or not."""
    for body in bodies + junk:
        proven = framescan.plain_record(body, 0, len(body))
        assert SOURCE.plain_record(body, 0, len(body)) == proven
        if proven:
            check_record(body)


def test_go_library_records_are_proven_plain() -> None:
    """What the Go plugin library writes takes the fast path: no batch parse at all."""
    bodies = list(_frames(_bin("go-plugin-frames")))
    assert bodies
    assert all(SOURCE.plain_record(b, 0, len(b)) for b in bodies)
    parts: list[bytes] = []
    data = _bin("go-plugin-frames")
    pos, count, unproven, bad = framescan.scan(data, 0, DEFAULT_MAX_FRAME, parts, True)
    assert (pos, count, unproven, bad) == (len(data), len(bodies), 0, -1)
