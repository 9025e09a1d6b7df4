"""The controller's journal on disk: one framed record per line, each with its own integrity.

A record is one line of bytes: `<length> <crc32> <json>\\n`, where length is the decimal byte
count of the JSON text and crc32 its CRC-32 in 8 hex digits. The JSON is ASCII (escaped), so
it never holds a newline. Read as bytes, a record is sound when its framing, length, checksum,
JSON and fields all check out; a record that is valid JSON but not one of ours is damage too.

Recovery keeps every sound record up to the first damaged one and treats the rest as the
damaged tail: the runtime moves it aside to `<journal>.damaged-<offset>` before it starts,
and `dvs controller check-journal` reports the same without starting. Nothing after the
first damage is trusted: a torn or flipped length could make later bytes look like records.
What the tail held the controller learns again from the agents' table reports.

The previous version wrote plain JSON lines. Such a journal (its first byte is `{`) is read
the same way, line by line, with the same record checks, and rewritten in this format once
the controller starts on it.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

# Largest record we write or accept, in bytes of JSON: a VM record is about 130 bytes, so a
# line claiming more is damage, not a record (and we never allocate on a damaged length).
RECORD_MAX_BYTES = 4_096
VM_STATES = ("creating", "active", "moving", "deleted", "failed", "lost")
MAX_VLAN = 4094
MAX_VM_NUMBER = (1 << 24) - 1  # the MAC holds a 24-bit VM number
MAX_INT = 1 << 63


def encode(record: dict) -> bytes:
    payload = json.dumps(record, separators=(",", ":")).encode("ascii")
    return b"%d %08x %s\n" % (len(payload), zlib.crc32(payload), payload)


def _is_int(v, lo: int = 0, hi: int = MAX_INT) -> bool:
    return type(v) is int and lo <= v <= hi


def _is_name(v) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 64


def check_record(r) -> str:
    """Why `r` is not a journal record ("" when it is one)."""
    if not isinstance(r, dict):
        return f"a JSON {type(r).__name__}, not an object"
    if "admit" in r:
        return "" if set(r) == {"admit"} and _is_name(r["admit"]) else "a bad host admission"
    if "maintenance" in r:
        # max_concurrent 0: the host left maintenance
        ok = set(r) == {"maintenance", "max_concurrent"} and _is_name(r["maintenance"]) \
            and _is_int(r["max_concurrent"], 0, 1_000)
        return "" if ok else "a bad maintenance record"
    if "rule" in r:
        # kind "": the rule was removed
        ok = (set(r) == {"rule", "kind", "vms"} and _is_name(r["rule"]) and r["kind"] in ("", "anti", "together")
              and isinstance(r["vms"], list) and len(r["vms"]) <= 64 and all(map(_is_name, r["vms"])))
        return "" if ok else "a bad placement rule record"
    if "host_incarnation" in r:
        ok = set(r) == {"host_incarnation", "incarnation"} and _is_name(r["host_incarnation"]) \
            and _is_int(r["incarnation"])
        return "" if ok else "a bad host incarnation"
    if set(r) != {"vm", "number", "profile", "vlan", "host", "seq", "seq_issued", "state"}:
        return "an object that is no VM record"
    ok = (_is_name(r["vm"]) and _is_int(r["number"], 1, MAX_VM_NUMBER) and _is_name(r["profile"])
          and _is_int(r["vlan"], 1, MAX_VLAN) and _is_name(r["host"]) and _is_int(r["seq"])
          and _is_int(r["seq_issued"]) and r["seq_issued"] >= r["seq"] and r["state"] in VM_STATES)
    return "" if ok else f"a VM record with bad fields ({r.get('vm')!r})"[:120]


@dataclass
class Recovery:
    """What a journal holds: the sound records and where (if anywhere) the damage starts."""

    path: Path
    records: list[dict]
    size_bytes: int
    sound_bytes: int  # the sound prefix; == size_bytes when nothing is damaged
    legacy: bool  # plain JSON lines of the previous version
    why: str = ""  # what is wrong at sound_bytes

    @property
    def damaged(self) -> bool:
        return self.sound_bytes < self.size_bytes

    def damaged_path(self) -> Path:
        return self.path.with_name(f"{self.path.name}.damaged-{self.sound_bytes}")

    def summary(self) -> str:
        if not self.damaged:
            return (f"journal {self.path}: sound, {len(self.records)} records ({self.size_bytes} bytes"
                    + (", previous plain-JSON format" if self.legacy else "") + ")")
        return (f"journal {self.path}: damaged at byte {self.sound_bytes} of {self.size_bytes} ({self.why}); "
                f"{len(self.records)} records before it are sound")


def _parse_framed(line: bytes) -> tuple[dict | None, str]:
    head = line.split(b" ", 2)
    if len(head) != 3 or not head[0].isdigit() or len(head[0]) > 5 or len(head[1]) != 8:
        return None, "no record framing"
    length, payload = int(head[0]), head[2]
    if length > RECORD_MAX_BYTES or len(payload) != length:
        return None, f"length {length} does not match the record"
    try:
        crc = int(head[1], 16)
    except ValueError:
        return None, "no checksum"
    if zlib.crc32(payload) != crc:
        return None, "checksum mismatch"
    return _parse_json(payload)


def _parse_json(payload: bytes) -> tuple[dict | None, str]:
    try:
        r = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None, "not JSON"
    why = check_record(r)
    return (None, why) if why else (r, "")


def read(path: str | Path) -> Recovery:
    """Read a journal (missing: empty). Raises OSError when it cannot be read at all."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Recovery(path, [], 0, 0, False)
    legacy = data[:1] == b"{"
    records: list[dict] = []
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos, pos + RECORD_MAX_BYTES + 32)
        if nl < 0:
            return Recovery(path, records, len(data), pos, legacy, "an unterminated record (a torn write?)")
        line = data[pos:nl]
        r, why = _parse_json(line) if legacy else _parse_framed(line)
        if r is None:
            return Recovery(path, records, len(data), pos, legacy, why)
        records.append(r)
        pos = nl + 1
    return Recovery(path, records, len(data), len(data), legacy)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def repair(rec: Recovery) -> Path | None:
    """Make the journal on disk hold only its sound records, in the current format: the damaged
    tail goes to `rec.damaged_path()` (returned), a legacy journal is rewritten. Durable
    (fsynced) before it returns, so a crash during repair loses nothing sound."""
    moved = None
    if rec.damaged:
        moved = rec.damaged_path()
        with open(rec.path, "rb") as f:
            f.seek(rec.sound_bytes)
            tail = f.read()
        with open(moved, "wb") as out:
            out.write(tail)
            out.flush()
            os.fsync(out.fileno())
    if rec.legacy:
        tmp = rec.path.with_name(rec.path.name + f".rewrite-{os.getpid()}")
        with open(tmp, "wb") as out:
            out.write(b"".join(encode(r) for r in rec.records))
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(rec.path)
    elif rec.damaged:
        os.truncate(rec.path, rec.sound_bytes)
        with open(rec.path, "rb+") as f:
            os.fsync(f.fileno())
    if moved is not None or rec.legacy:
        _fsync_dir(rec.path)
    return moved
