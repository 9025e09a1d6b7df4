"""The wire format: msgpack `[schema_version, msg_type, body]`, validated on the way in.

Every message from the bus is untrusted. `decode` either returns a well-typed
`(msg_type, body)` or raises `WireError` saying what was wrong; callers drop and
count. Nothing here does I/O.
"""

from __future__ import annotations

from enum import IntEnum

import msgpack

SCHEMA_VERSION = 1

# Largest frame we accept, in bytes. Measured: a snapshot costs ~29 bytes per entry with the
# names the controller gives (hN, vEthN), so one of MAX_LIST_LEN (200,000) entries, 64 hosts x
# 3,125 VMs, is 5.9 MB; 64,000 entries are 1.8 MB.
MAX_FRAME_BYTES = 8 * 1024 * 1024
# Largest frame on channels that never carry a snapshot (gossip, requests, control), in bytes.
# The largest legitimate ones: a gossip batch (2,000 updates, ~62 kB), a pull reply (5,000,
# ~150 kB), a vnic_plug request (~28 bytes a binding: ~37,000 bindings a call).
MAX_SMALL_FRAME_BYTES = 1024 * 1024
# Hard cap set on sockets (ZMQ_MAXMSGSIZE): above it libzmq drops the connection before we
# ever see the frame, so hostile giants cannot exhaust memory. Between the two caps a frame
# reaches decode(), which rejects and counts it. (The controller's socket; the agent fits a
# cap to each socket's role, socket_cap_bytes.)
SOCKET_MAX_BYTES = 2 * MAX_FRAME_BYTES
# Largest message a PUB socket takes in, in bytes: all a subscriber ever sends it is a
# subscription (one flag byte and a topic; ours subscribe to the empty topic).
SUBSCRIPTION_MAX_BYTES = 256


def socket_cap_bytes(frame_limit_bytes: int) -> int:
    """ZMQ_MAXMSGSIZE for a socket whose frames decode() bounds at `frame_limit_bytes`: twice
    that, so a frame somewhat over the limit still reaches decode() and is counted, and one far
    over it costs the sender its connection instead of costing us the memory."""
    return 2 * frame_limit_bytes

MAX_U64 = (1 << 64) - 1
MAX_MAC = (1 << 48) - 1
MAX_VLAN = 4094
MAX_NAME_LEN = 64
MAX_LIST_LEN = 200_000


class MsgType(IntEnum):
    """Message types. Only append: a number once used keeps its meaning forever."""

    HEARTBEAT = 1  # gossip PUB: origin's liveness, latest update number, table digest
    UPDATES = 2  # gossip PUB: a batch of MAC updates numbered by their origin
    PULL_REQ = 3  # peer -> origin: resend my updates numbered from..to
    PULL_REPLY = 4  # origin -> peer: those updates (or a snapshot when they are gone)
    SNAPSHOT_REQ = 5  # peer -> peer: send me your whole table
    SNAPSHOT = 6  # the whole table, plus the sender's version vector
    REGISTER = 7  # agent -> controller: I am up, here are my endpoints
    PEERS = 8  # controller -> agent: the membership (who to subscribe to)
    ATTACH = 9  # controller -> agent: create and activate a port for a VM
    DETACH = 10  # controller -> agent: remove a VM's port (optionally delete the VM)
    PREPARE = 11  # controller -> agent: reserve a port for an incoming VM (move step 1)
    SWITCHOVER = 12  # controller -> agent: activate the incoming VM with its new seq (move step 2)
    ACK = 13  # agent -> controller: result of a command, stamped
    APPLIED = 14  # agent -> controller: entries this agent applied, stamped
    AGENT_STATUS = 15  # agent -> controller: periodic liveness and mesh/table state
    REQUEST = 16  # client -> controller or agent: an API call
    REPLY = 17  # the answer to a REQUEST
    TABLE_REPORT = 18  # agent -> controller: (part of) its whole table, after (re)registering
    APPLY_REPORT = 19  # agent -> controller: entries applied one by one, and origin ranges held


class WireError(ValueError):
    """A message that is not ours or not well-formed: the sender's fault, not ours."""


def encode(msg_type: MsgType, body: list) -> bytes:
    return msgpack.packb([SCHEMA_VERSION, int(msg_type), body], use_bin_type=True)


# ---- validators: each takes a value and returns it (possibly normalised) or raises WireError


def _show(v) -> str:
    """A short description of an offending value; never recurses into a (hostile) nested one."""
    if isinstance(v, (list, dict, tuple)):
        return f"a {type(v).__name__} of {len(v)} items"
    return repr(v)[:40]


def _int(lo: int, hi: int):
    def check(v):
        if type(v) is not int or v < lo or v > hi:
            raise WireError(f"expected int in [{lo}, {hi}], got {_show(v)}")
        return v

    return check


def _str(max_len: int = MAX_NAME_LEN, allow_empty: bool = False):
    def check(v):
        if type(v) is not str or len(v) > max_len or (not allow_empty and not v):
            raise WireError(f"expected str of length <= {max_len}, got {_show(v)}")
        return v

    return check


def _bool(v):
    if type(v) is not bool:
        raise WireError(f"expected bool, got {_show(v)}")
    return v


def _any(v):
    return v


def _dict(v):
    if type(v) is not dict:
        raise WireError(f"expected map, got {type(v).__name__}")
    return v


# Every check returns the value it was given (or one equal to it), so the containers below
# validate in place and hand back the decoded list itself: no copy per message on hot paths.


def _list_of(item, max_len: int = MAX_LIST_LEN):
    def check(v):
        if type(v) is not list or len(v) > max_len:
            raise WireError(f"expected list of <= {max_len} items")
        for x in v:
            item(x)
        return v

    return check


def _tuple(*fields):
    n = len(fields)

    def check(v):
        if type(v) is not list or len(v) != n:
            raise WireError(f"expected a list of {n} fields, got {_show(v)}")
        for f, x in zip(fields, v, strict=True):
            f(x)
        return v

    return check


U64 = _int(0, MAX_U64)
I64 = _int(-(1 << 63), (1 << 63) - 1)
SEQ = _int(0, (1 << 32) - 1)
VLAN = _int(1, MAX_VLAN)
MAC = _int(0, MAX_MAC)
NAME = _str()
ENDPOINT = _str(256)
TEXT = _str(1024, allow_empty=True)

# An entry of the MAC table as it travels: vlan, mac, host, port, seq, tombstone
ENTRY = _tuple(VLAN, MAC, NAME, NAME, SEQ, _bool)
# A numbered update from its origin: n, then the entry fields
UPDATE = _tuple(U64, VLAN, MAC, NAME, NAME, SEQ, _bool)
# An apply report: vlan, mac, host, seq, tombstone, monotonic ns
APPLIED_ROW = _tuple(VLAN, MAC, NAME, SEQ, _bool, U64)
# The same, then the reporter's own update number for an entry it originated (0: not its own)
APPLIED_ROW_N = _tuple(VLAN, MAC, NAME, SEQ, _bool, U64, U64)
# Origin, its incarnation, first and last update number, monotonic ns: from then on the
# reporter's table dominates every one of those updates (holds it or a greater (seq, host))
APPLIED_RANGE = _tuple(NAME, U64, U64, U64, U64)


def entry_ok(vlan, mac, host, port, seq, tomb) -> bool:
    """ENTRY's verdict on one entry's fields, as a bool (the inline form of the hot paths)."""
    return (type(vlan) is int and 1 <= vlan <= MAX_VLAN and type(mac) is int and 0 <= mac <= MAX_MAC
            and type(host) is str and 0 < len(host) <= MAX_NAME_LEN
            and type(port) is str and 0 < len(port) <= MAX_NAME_LEN
            and type(seq) is int and 0 <= seq <= 0xFFFFFFFF and type(tomb) is bool)


def _rows(row_check, fast_ok, width: int):
    """A list of fixed-width rows: the hot lists (updates, entries, apply reports) are checked
    inline, row by row, without a call per field; a row that fails goes through `row_check`
    for the error message. Same verdict as _list_of(row_check), several times faster."""

    def check(v):
        if type(v) is not list or len(v) > MAX_LIST_LEN:
            raise WireError(f"expected list of <= {MAX_LIST_LEN} items")
        for row in v:
            if type(row) is not list or len(row) != width or not fast_ok(*row):
                row_check(row)  # raises, saying what is wrong
                raise WireError(f"bad row {_show(row)}")  # pragma: no cover - row_check raised
        return v

    return check


def _update_ok(n, vlan, mac, host, port, seq, tomb) -> bool:
    return type(n) is int and 0 <= n <= MAX_U64 and entry_ok(vlan, mac, host, port, seq, tomb)


def _applied_ok(vlan, mac, host, seq, tomb, t_ns) -> bool:
    return (type(vlan) is int and 1 <= vlan <= MAX_VLAN and type(mac) is int and 0 <= mac <= MAX_MAC
            and type(host) is str and 0 < len(host) <= MAX_NAME_LEN and type(seq) is int
            and 0 <= seq <= 0xFFFFFFFF and type(tomb) is bool and type(t_ns) is int and 0 <= t_ns <= MAX_U64)


def _applied_n_ok(vlan, mac, host, seq, tomb, t_ns, n) -> bool:
    return type(n) is int and 0 <= n <= MAX_U64 and _applied_ok(vlan, mac, host, seq, tomb, t_ns)


def _range_ok(origin, incarnation, lo, hi, t_ns) -> bool:
    return (type(origin) is str and 0 < len(origin) <= MAX_NAME_LEN and type(incarnation) is int
            and 0 <= incarnation <= MAX_U64 and type(lo) is int and type(hi) is int and 1 <= lo <= hi <= MAX_U64
            and type(t_ns) is int and 0 <= t_ns <= MAX_U64)


def _range_row(v):
    row = APPLIED_RANGE(v)
    if not 1 <= row[2] <= row[3]:
        raise WireError(f"range {row[2]}..{row[3]} is empty or starts below 1")
    return row


UPDATES_LIST = _rows(UPDATE, _update_ok, 7)
ENTRIES_LIST = _rows(ENTRY, entry_ok, 6)
APPLIED_LIST = _rows(APPLIED_ROW, _applied_ok, 6)
APPLIED_N_LIST = _rows(APPLIED_ROW_N, _applied_n_ok, 7)
RANGES_LIST = _rows(_range_row, _range_ok, 5)
# origin -> (incarnation, highest contiguous update number)
VERSION = _tuple(NAME, U64, U64)

SCHEMAS = {
    # origin, incarnation, latest update number, table digest, entry count
    MsgType.HEARTBEAT: _tuple(NAME, U64, U64, U64, U64),
    # origin, incarnation, updates
    MsgType.UPDATES: _tuple(NAME, U64, UPDATES_LIST),
    # origin wanted, its incarnation, first n, last n
    MsgType.PULL_REQ: _tuple(NAME, U64, U64, U64),
    # origin, incarnation, updates (empty and snapshot follows when the range is gone)
    MsgType.PULL_REPLY: _tuple(NAME, U64, UPDATES_LIST),
    MsgType.SNAPSHOT_REQ: _tuple(NAME),
    # sender, entries, sender's version vector
    MsgType.SNAPSHOT: _tuple(NAME, ENTRIES_LIST, _list_of(VERSION)),
    # host, incarnation, pub endpoint, rpc endpoint, pid
    MsgType.REGISTER: _tuple(NAME, U64, ENDPOINT, ENDPOINT, U64),
    # [[host, incarnation, pub endpoint, rpc endpoint], ...], membership epoch
    MsgType.PEERS: _tuple(_list_of(_tuple(NAME, U64, ENDPOINT, ENDPOINT)), U64),
    # op id, vm, vlan, mac, port, seq
    MsgType.ATTACH: _tuple(U64, NAME, VLAN, MAC, NAME, SEQ),
    # op id, vm, vlan, mac, tombstone seq (0 = only detach the port, keep the entry)
    MsgType.DETACH: _tuple(U64, NAME, VLAN, MAC, SEQ),
    # op id, vm, vlan, mac, port
    MsgType.PREPARE: _tuple(U64, NAME, VLAN, MAC, NAME),
    # op id, vm, vlan, mac, port, seq
    MsgType.SWITCHOVER: _tuple(U64, NAME, VLAN, MAC, NAME, SEQ),
    # op id, ok, detail, monotonic ns
    MsgType.ACK: _tuple(U64, _bool, TEXT, U64),
    # host, [[vlan, mac, host, seq, tombstone, monotonic ns], ...]
    MsgType.APPLIED: _tuple(NAME, APPLIED_LIST),
    # host, incarnation, peers heard, entries, digest, dropped malformed, membership epoch held
    MsgType.AGENT_STATUS: _tuple(NAME, U64, U64, U64, U64, U64, U64),
    # request id, method, args
    MsgType.REQUEST: _tuple(U64, NAME, _dict),
    # request id, ok, result (any msgpack value) or error text
    MsgType.REPLY: _tuple(U64, _bool, _any),
    # host, entries
    MsgType.TABLE_REPORT: _tuple(NAME, ENTRIES_LIST),
    # host, [[vlan, mac, host, seq, tombstone, monotonic ns, own update number], ...],
    # [[origin, incarnation, first n, last n, monotonic ns], ...]
    MsgType.APPLY_REPORT: _tuple(NAME, APPLIED_N_LIST, RANGES_LIST),
}


_BY_VALUE = {int(m): m for m in MsgType}


def decode(frame: bytes, max_bytes: int = MAX_FRAME_BYTES) -> tuple[MsgType, list]:
    """Parse and validate one frame. Raises WireError on anything unexpected."""
    if len(frame) > max_bytes:
        raise WireError(f"frame of {len(frame)} bytes exceeds {max_bytes}")
    try:
        # unpackb bounds every container and string by the frame's own length.
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise WireError(f"not msgpack: {type(e).__name__}") from None
    except RecursionError:  # pragma: no cover - msgpack bounds nesting, but never let it through
        raise WireError("not msgpack: nested too deeply") from None
    if type(obj) is not list or len(obj) != 3:
        raise WireError("expected [schema_version, msg_type, body]")
    version, mtype, body = obj
    # `type(...) is int`: True and 1.0 compare equal to 1 but are not what a peer of ours sends.
    if type(version) is not int or version != SCHEMA_VERSION:
        raise WireError(f"schema version {_show(version)} is not {SCHEMA_VERSION}")
    if type(mtype) is not int or mtype not in _BY_VALUE:
        raise WireError(f"unknown message type {_show(mtype)}")
    mt = _BY_VALUE[mtype]
    return mt, SCHEMAS[mt](body)
