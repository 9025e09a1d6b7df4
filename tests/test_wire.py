"""agent/wire.py: round trips for every message type, and everything malformed raises WireError."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import wire
from agent.wire import MAX_FRAME_BYTES, MAX_MAC, MAX_U64, MAX_VLAN, SCHEMA_VERSION, MsgType, WireError

MAC = 0x02_00_00_00_00_2A

# One valid body per message type, touching the edges of every range.
VALID: dict[MsgType, list] = {
    MsgType.HEARTBEAT: ["h1", 3, 10, MAX_U64, 5],
    MsgType.UPDATES: [
        "h1",
        2,
        [[1, 1, 0, "h1", "vEth1", 0, False], [2, MAX_VLAN, MAX_MAC, "h2", "vEth2", (1 << 32) - 1, True]],
    ],
    MsgType.PULL_REQ: ["h1", 2, 1, 10],
    MsgType.PULL_REPLY: ["h1", 2, []],
    MsgType.SNAPSHOT_REQ: ["h2"],
    MsgType.SNAPSHOT: ["h2", [[100, MAC, "h1", "vEth1", 0, False]], [["h1", 1, 5], ["h2", 7, 0]]],
    MsgType.REGISTER: ["h1", 1, "tcp://127.0.0.1:5001", "tcp://127.0.0.1:5002", 4242],
    MsgType.PEERS: [[["h1", 1, "tcp://a:1", "tcp://a:2"], ["h2", 9, "tcp://b:1", "tcp://b:2"]], 3],
    MsgType.ATTACH: [1, "vm1", 100, MAC, "vEth1", 0],
    MsgType.DETACH: [2, "vm1", 100, MAC, 0],
    MsgType.PREPARE: [3, "vm1", 100, MAC, "vEth1"],
    MsgType.SWITCHOVER: [4, "vm1", 100, MAC, "vEth1", 1],
    MsgType.ACK: [4, True, "", 123_456_789],
    MsgType.APPLIED: ["h1", [[100, MAC, "h2", 1, False, 5], [110, 7, "h3", 2, True, MAX_U64]]],
    MsgType.AGENT_STATUS: ["h1", 1, 2, 3, 4, 0, 7],
    MsgType.REQUEST: [1, "status", {"verbose": True, "n": [1, 2.5, None, "x"]}],
    MsgType.REPLY: [1, False, {"nested": {"a": [1, b"raw"]}}],
    MsgType.TABLE_REPORT: ["h1", [[100, 5, "h1", "vEth1", 3, False]]],
    MsgType.APPLY_REPORT: ["h1", [[100, MAC, "h1", 1, False, 5, 3]], [["h2", 1, 1, 8, 9], ["h3", 2, 4, 4, MAX_U64]]],
}


def frame(version, mtype, body) -> bytes:
    return msgpack.packb([version, mtype, body], use_bin_type=True)


# ---------------------------------------------------------------- round trips


def test_every_message_type_has_a_schema_and_a_sample():
    assert set(wire.SCHEMAS) == set(MsgType)
    assert set(VALID) == set(MsgType)


@pytest.mark.parametrize("mt", list(MsgType), ids=lambda m: m.name)
def test_round_trip(mt):
    data = wire.encode(mt, VALID[mt])
    got_mt, body = wire.decode(data)
    assert got_mt is mt
    assert body == VALID[mt]
    # The header is what DESIGN.md says: [schema_version, msg_type, body].
    assert msgpack.unpackb(data, raw=False)[:2] == [SCHEMA_VERSION, int(mt)]


def test_message_type_numbers_never_change():
    # "msg_type is an IntEnum that only grows": a renumbering would break mixed-version clusters.
    assert [(m.name, m.value) for m in MsgType] == [
        ("HEARTBEAT", 1), ("UPDATES", 2), ("PULL_REQ", 3), ("PULL_REPLY", 4), ("SNAPSHOT_REQ", 5),
        ("SNAPSHOT", 6), ("REGISTER", 7), ("PEERS", 8), ("ATTACH", 9), ("DETACH", 10), ("PREPARE", 11),
        ("SWITCHOVER", 12), ("ACK", 13), ("APPLIED", 14), ("AGENT_STATUS", 15), ("REQUEST", 16),
        ("REPLY", 17), ("TABLE_REPORT", 18), ("APPLY_REPORT", 19),
    ]


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=64)
u64 = st.integers(0, MAX_U64)
seqs = st.integers(0, (1 << 32) - 1)
vlans = st.integers(1, MAX_VLAN)
macs = st.integers(0, MAX_MAC)
updates = st.lists(st.tuples(u64, vlans, macs, names, names, seqs, st.booleans()).map(list), max_size=20)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(origin=names, inc=u64, ups=updates)
def test_updates_round_trip_property(origin, inc, ups):
    assert wire.decode(wire.encode(MsgType.UPDATES, [origin, inc, ups])) == (MsgType.UPDATES, [origin, inc, ups])


@settings(max_examples=80, deadline=None, derandomize=True)
@given(op=u64, vm=names, vlan=vlans, mac=macs, port=names, seq=seqs)
def test_attach_round_trip_property(op, vm, vlan, mac, port, seq):
    body = [op, vm, vlan, mac, port, seq]
    assert wire.decode(wire.encode(MsgType.ATTACH, body)) == (MsgType.ATTACH, body)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    entries=st.lists(st.tuples(vlans, macs, names, names, seqs, st.booleans()).map(list), max_size=20),
    versions=st.lists(st.tuples(names, u64, u64).map(list), max_size=10),
)
def test_snapshot_round_trip_property(entries, versions):
    body = ["h1", entries, versions]
    assert wire.decode(wire.encode(MsgType.SNAPSHOT, body)) == (MsgType.SNAPSHOT, body)


# ---------------------------------------------------------------- malformed frames


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"\xff\xfe\xfd",
        b"hello world",
        msgpack.packb(1),
        msgpack.packb("x"),
        msgpack.packb({"a": 1}),
        msgpack.packb([]),
        msgpack.packb([1, 1]),
        msgpack.packb([1, 1, ["h1", 1, 0, 0, 0], 4]),
        msgpack.packb(None),
    ],
    ids=repr,
)
def test_garbage_raises(data):
    with pytest.raises(WireError):
        wire.decode(data)


@pytest.mark.parametrize("mt", list(MsgType), ids=lambda m: m.name)
def test_every_truncation_raises(mt):
    data = wire.encode(mt, VALID[mt])
    for cut in range(len(data)):
        with pytest.raises(WireError):
            wire.decode(data[:cut])


def test_trailing_bytes_raise():
    with pytest.raises(WireError):
        wire.decode(wire.encode(MsgType.SNAPSHOT_REQ, ["h1"]) + b"\x00")


@pytest.mark.parametrize("version", [0, 2, -1, 255, "1", None, [1], MAX_U64])
def test_wrong_schema_version_raises(version):
    with pytest.raises(WireError, match="schema version"):
        wire.decode(frame(version, int(MsgType.HEARTBEAT), VALID[MsgType.HEARTBEAT]))


@pytest.mark.parametrize("mtype", [0, 99, 1000, -1, "1", "HEARTBEAT", None, [1], 2.5])
def test_unknown_message_type_raises(mtype):
    with pytest.raises(WireError, match="unknown message type"):
        wire.decode(frame(SCHEMA_VERSION, mtype, VALID[MsgType.HEARTBEAT]))


@pytest.mark.parametrize(
    "version,mtype",
    [(True, 1), (1.0, 1), (SCHEMA_VERSION, True), (SCHEMA_VERSION, 1.0)],
    ids=["version-true", "version-1.0", "type-true", "type-1.0"],
)
def test_header_rejects_bool_and_float_for_ints(version, mtype):
    # Body fields reject bool/float where an int is expected (type(v) is int); the header should too.
    with pytest.raises(WireError):
        wire.decode(frame(version, mtype, VALID[MsgType.HEARTBEAT]))


def _bad_bodies():
    hb = VALID[MsgType.HEARTBEAT]
    at = VALID[MsgType.ATTACH]
    up = VALID[MsgType.UPDATES]
    good_update = up[2][0]
    cases = [
        # ATTACH: op id, vm, vlan, mac, port, seq
        (MsgType.ATTACH, [1, "vm1", 0, MAC, "vEth1", 0], "vlan 0"),
        (MsgType.ATTACH, [1, "vm1", 4095, MAC, "vEth1", 0], "vlan 4095"),
        (MsgType.ATTACH, [1, "vm1", 5000, MAC, "vEth1", 0], "vlan 5000"),
        (MsgType.ATTACH, [1, "vm1", -100, MAC, "vEth1", 0], "negative vlan"),
        (MsgType.ATTACH, [1, "vm1", True, MAC, "vEth1", 0], "bool vlan"),
        (MsgType.ATTACH, [1, "vm1", 100.0, MAC, "vEth1", 0], "float vlan"),
        (MsgType.ATTACH, [1, "vm1", "100", MAC, "vEth1", 0], "str vlan"),
        (MsgType.ATTACH, [1, "vm1", 100, MAX_MAC + 1, "vEth1", 0], "mac > 48 bits"),
        (MsgType.ATTACH, [1, "vm1", 100, -1, "vEth1", 0], "negative mac"),
        (MsgType.ATTACH, [1, "vm1", 100, MAC, "vEth1", 1 << 32], "seq > 32 bits"),
        (MsgType.ATTACH, [1, "vm1", 100, MAC, "vEth1", -1], "negative seq"),
        (MsgType.ATTACH, [1, "vm1", 100, MAC, "vEth1", MAX_U64], "huge seq"),
        (MsgType.ATTACH, [1, "vm1", 100, MAC, "vEth1", -(1 << 63)], "most negative seq"),
        (MsgType.ATTACH, [-1, "vm1", 100, MAC, "vEth1", 0], "negative op id"),
        (MsgType.ATTACH, [False, "vm1", 100, MAC, "vEth1", 0], "bool op id"),
        (MsgType.ATTACH, [1, "", 100, MAC, "vEth1", 0], "empty vm name"),
        (MsgType.ATTACH, [1, "v" * 65, 100, MAC, "vEth1", 0], "vm name too long"),
        (MsgType.ATTACH, [1, b"vm1", 100, MAC, "vEth1", 0], "bin vm name"),
        (MsgType.ATTACH, [1, 7, 100, MAC, "vEth1", 0], "int vm name"),
        (MsgType.ATTACH, at[:-1], "missing field"),
        (MsgType.ATTACH, at + [0], "extra field"),
        (MsgType.ATTACH, {"op": 1}, "map body"),
        (MsgType.ATTACH, None, "nil body"),
        # HEARTBEAT: origin, incarnation, latest, digest, count
        (MsgType.HEARTBEAT, ["h1", -1, 0, 0, 0], "negative incarnation"),
        (MsgType.HEARTBEAT, ["h1", 1, 0, -5, 0], "negative digest"),
        (MsgType.HEARTBEAT, ["h1", 1, True, 0, 0], "bool latest"),
        (MsgType.HEARTBEAT, ["h1", 1, 0, 0, 1.5], "float count"),
        (MsgType.HEARTBEAT, hb[:4], "4 of 5 fields"),
        # UPDATES: nested lists of the wrong length or types
        (MsgType.UPDATES, ["h1", 1, [good_update[:-1]]], "update of 6 fields"),
        (MsgType.UPDATES, ["h1", 1, [good_update + [0]]], "update of 8 fields"),
        (MsgType.UPDATES, ["h1", 1, [[1, 100, MAC, "h1", "p", 0, 0]]], "int tombstone"),
        (MsgType.UPDATES, ["h1", 1, [[1, 0, MAC, "h1", "p", 0, False]]], "update vlan 0"),
        (MsgType.UPDATES, ["h1", 1, [[-1, 100, MAC, "h1", "p", 0, False]]], "negative update number"),
        (MsgType.UPDATES, ["h1", 1, good_update], "updates not a list of lists"),
        (MsgType.UPDATES, ["h1", 1, {"1": good_update}], "updates as map"),
        # SNAPSHOT / PEERS / APPLIED: nested tuples
        (MsgType.SNAPSHOT, ["h1", [[100, MAC, "h1", "p", 0]], []], "entry of 5 fields"),
        (MsgType.SNAPSHOT, ["h1", [], [["h1", 1]]], "version of 2 fields"),
        (MsgType.SNAPSHOT, ["h1", [], [["h1", 1, -1]]], "negative version"),
        (MsgType.PEERS, [[["h1", 1, "pub"]], 1], "member of 3 fields"),
        (MsgType.PEERS, [[["h1", 1, "", "rpc"]], 1], "empty endpoint"),
        (MsgType.PEERS, [[["h1", 1, "e" * 257, "rpc"]], 1], "endpoint too long"),
        (MsgType.PEERS, [["h1", 1, "pub", "rpc"], 1], "members not nested"),
        (MsgType.PEERS, [[["h1", 1, "pub", "rpc"]]], "no epoch"),
        (MsgType.APPLIED, ["h1", [[100, MAC, "h1", 0, False]]], "applied of 5 fields"),
        (MsgType.APPLIED, ["h1", [[100, MAC, "h1", 0, False, -1]]], "negative stamp"),
        (MsgType.APPLY_REPORT, ["h1", [[100, MAC, "h1", 0, False, 5]], []], "row without own number"),
        (MsgType.APPLY_REPORT, ["h1", [], [["h2", 1, 3, 2, 5]]], "empty range"),
        (MsgType.APPLY_REPORT, ["h1", [], [["h2", 1, 0, 2, 5]]], "range from update 0"),
        (MsgType.APPLY_REPORT, ["h1", [], [["", 1, 1, 2, 5]]], "range of a nameless origin"),
        (MsgType.APPLY_REPORT, ["h1", []], "no ranges"),
        # ACK / REQUEST / REPLY
        (MsgType.ACK, [1, 1, "ok", 5], "int where bool expected"),
        (MsgType.ACK, [1, True, "d" * 1025, 5], "detail too long"),
        (MsgType.ACK, [1, True, None, 5], "nil detail"),
        (MsgType.REQUEST, [1, "status", []], "list args"),
        (MsgType.REQUEST, [1, "", {}], "empty method"),
        (MsgType.REPLY, [1, "yes", None], "str ok"),
        (MsgType.SNAPSHOT_REQ, [], "no fields"),
        (MsgType.SNAPSHOT_REQ, "h1", "str body"),
    ]
    return [pytest.param(mt, body, id=f"{mt.name}-{why}") for mt, body, why in cases]


@pytest.mark.parametrize("mt,body", _bad_bodies())
def test_bad_body_raises(mt, body):
    with pytest.raises(WireError):
        wire.decode(frame(SCHEMA_VERSION, int(mt), body))


def test_non_utf8_string_raises():
    # A msgpack str whose bytes are not UTF-8.
    data = b"\x93\x01\x05\x91\xa2\xff\xfe"  # [1, 5, [<str ff fe>]]
    with pytest.raises(WireError):
        wire.decode(data)


def test_non_string_map_keys_raise():
    with pytest.raises(WireError):
        wire.decode(frame(SCHEMA_VERSION, int(MsgType.REQUEST), [1, "status", {1: 2}]))


def test_list_length_bound():
    ok = ["h1", [], [["h1", 1, 1]] * 10]
    assert wire.decode(frame(1, int(MsgType.SNAPSHOT), ok))[0] is MsgType.SNAPSHOT
    too_long = ["h1", [], [["h1", 1, 1]] * (wire.MAX_LIST_LEN + 1)]
    with pytest.raises(WireError):
        wire.decode(frame(1, int(MsgType.SNAPSHOT), too_long))


# ---------------------------------------------------------------- size bound


def _reply_with_blob(size: int) -> bytes:
    return wire.encode(MsgType.REPLY, [1, True, b"x" * size])


def test_oversize_frames_raise():
    with pytest.raises(WireError, match="exceeds"):
        wire.decode(b"\x00" * (MAX_FRAME_BYTES + 1))
    overhead = len(_reply_with_blob(100_000)) - 100_000
    big = _reply_with_blob(MAX_FRAME_BYTES - overhead + 1)
    assert len(big) == MAX_FRAME_BYTES + 1
    with pytest.raises(WireError, match="exceeds"):
        wire.decode(big)


def test_frame_of_exactly_max_size_is_accepted():
    overhead = len(_reply_with_blob(100_000)) - 100_000
    data = _reply_with_blob(MAX_FRAME_BYTES - overhead)
    assert len(data) == MAX_FRAME_BYTES
    mt, body = wire.decode(data)
    assert mt is MsgType.REPLY and len(body[2]) == MAX_FRAME_BYTES - overhead


# ---------------------------------------------------------------- never anything but WireError


def _decode_outcome(data: bytes):
    """decode() must return a validated message or raise WireError; anything else fails the test."""
    try:
        mt, body = wire.decode(data)
    except WireError:
        return None
    # What decode accepts must survive a re-encode unchanged (the schema normalises nothing away).
    assert wire.decode(wire.encode(mt, body)) == (mt, body)
    return mt


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_only_raise_wire_error(data):
    _decode_outcome(data)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), MAX_U64)
    | st.floats(allow_nan=False)
    | st.text(max_size=70)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=8) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    version=st.sampled_from([SCHEMA_VERSION, SCHEMA_VERSION, SCHEMA_VERSION, 0, 2]),
    mtype=st.integers(-1, 20),
    body=msgpack_values,
)
def test_arbitrary_msgpack_only_raises_wire_error(version, mtype, body):
    _decode_outcome(frame(version, mtype, body))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    mt=st.sampled_from(list(MsgType)),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.sampled_from("rid")), max_size=4),
)
def test_mutated_valid_frames_only_raise_wire_error(mt, edits):
    data = bytearray(wire.encode(mt, VALID[mt]))
    for pos, byte, how in edits:
        i = pos % (len(data) + 1)
        if how == "r" and i < len(data):
            data[i] = byte
        elif how == "i":
            data.insert(i, byte)
        elif how == "d" and i < len(data):
            del data[i]
    _decode_outcome(bytes(data))


def _nested_list_frame(depth: int) -> bytes:
    # [1, 1, [[[...]]]]: a HEARTBEAT whose body is `depth` lists deep. About `depth` bytes.
    return b"\x93\x01\x01" + b"\x91" * depth + b"\x90"


def test_very_deep_nesting_beyond_msgpack_limit_raises_wire_error():
    with pytest.raises(WireError):
        wire.decode(_nested_list_frame(5000))


@pytest.mark.parametrize("depth", [900, 1000, 1015, 1100])
def test_deep_nesting_within_msgpack_limit_raises_wire_error(depth):
    # Regression: error messages once repr()'d the offending value, and repr of a ~1000-deep
    # list (inside msgpack's own nesting limit) raised RecursionError instead of WireError.
    data = _nested_list_frame(depth)
    assert len(data) < 1200  # a 1 KB frame
    with pytest.raises(WireError):
        wire.decode(data)


def test_deeply_nested_header_fields_raise_wire_error():
    nested = b"\x91" * 1015 + b"\x90"
    for data in (b"\x93" + nested + b"\x01\x90", b"\x93\x01" + nested + b"\x90"):
        with pytest.raises(WireError):
            wire.decode(data)


def test_decode_takes_a_smaller_size_bound():
    data = _reply_with_blob(1000)
    assert wire.decode(data, len(data))[0] is MsgType.REPLY
    with pytest.raises(WireError, match="exceeds"):
        wire.decode(data, len(data) - 1)


_FIELD_VALUES = st.one_of(st.integers(-2, 5), st.integers(4090, 4100), st.integers(2**48 - 2, 2**48 + 1),
                          st.integers(2**64 - 1, 2**64), st.booleans(), st.text(max_size=3),
                          st.just("x" * 65), st.none(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_FIELD_VALUES, min_size=5, max_size=8), max_size=4))
def test_fast_row_validators_agree_with_the_field_by_field_ones(rows):
    # The inline validators of the hot lists must accept exactly what the general ones accept.
    for fast, slow in ((wire.UPDATES_LIST, wire._list_of(wire.UPDATE)),
                       (wire.ENTRIES_LIST, wire._list_of(wire.ENTRY)),
                       (wire.APPLIED_LIST, wire._list_of(wire.APPLIED_ROW)),
                       (wire.RANGES_LIST, wire._list_of(wire._range_row))):
        try:
            expected = slow(rows)
        except wire.WireError:
            expected = None
        try:
            got = fast(rows)
        except wire.WireError:
            got = None
        assert got == expected


def test_the_largest_legitimate_messages_fit_their_sockets_caps():
    # The bounds wire.py documents, measured: a full table (MAX_LIST_LEN entries, 64 hosts' names and
    # vEth ports as the controller gives them) in one snapshot, a full gossip batch, a subscription.
    from agent.core import FRAME_LIMIT, PUB_BATCH_MAX

    entries = [[100 + i % 50, 0x02_00_00_00_00_00 + i, f"h{1 + i % 64}", f"vEth{i + 1}", 1000 + i % 7, False]
               for i in range(wire.MAX_LIST_LEN)]
    versions = [[f"h{h}", (1 << 62) + h, 100_000] for h in range(1, 65)]
    snapshot = wire.encode(MsgType.SNAPSHOT, ["h64", entries, versions])
    assert len(snapshot) <= FRAME_LIMIT["pull"] == MAX_FRAME_BYTES
    assert wire.decode(snapshot, FRAME_LIMIT["pull"])[0] is MsgType.SNAPSHOT
    batch = [[(1 << 40) + i, 4094, 0x02_00_00_00_00_00 + i, "h64", f"vEth{100_000 + i}", 1 << 31, False]
             for i in range(PUB_BATCH_MAX)]
    assert len(wire.encode(MsgType.UPDATES, ["h64", 1 << 62, batch])) <= FRAME_LIMIT["sub"] // 4
    # A subscription to everything is one flag byte (ZMTP 3.1's SUBSCRIBE command: ten bytes).
    assert len(b"\x09SUBSCRIBE") < wire.SUBSCRIPTION_MAX_BYTES
    assert wire.socket_cap_bytes(FRAME_LIMIT["sub"]) > FRAME_LIMIT["sub"]  # (over the limit: still counted)
