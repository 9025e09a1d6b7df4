"""The MAC address table and the one merge rule of DESIGN.md.

Key `(vlan, mac)`; value `(host, port, seq, tombstone)`. An incoming entry wins iff
`(seq, host)` is greater than what we hold: a last-writer-wins register with a total
order, so any delivery order, duplicate or delay converges to the same table.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

Key = tuple[int, int]  # (vlan, mac)


class Entry(NamedTuple):
    host: str
    port: str
    seq: int
    tombstone: bool = False

    def rank(self) -> tuple[int, str]:
        return (self.seq, self.host)


@functools.lru_cache(maxsize=1 << 15)
def entry_hash(vlan: int, mac: int, e: Entry) -> int:
    """A stable 64-bit hash of one entry (the same in every process, unlike hash()).

    Cached: an entry's hash is needed again when a newer one replaces it, and in the
    simulator every agent hashes the same entries (32k entries, ~5 MB).
    """
    data = f"{vlan}|{mac}|{e.host}|{e.port}|{e.seq}|{int(e.tombstone)}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


# A gossip row made ready to merge: (key, entry, entry_hash, seq, host, tombstone). Built
# once per message: the simulator hands the same prepared rows to every subscriber, so
# 1,000 agents share one key and one Entry object instead of making 1,000 of each.
PreparedRow = tuple[Key, Entry, int, int, str, bool]


# A message of at least this many distinct keys also gets the all-new merge ready (PreparedRows).
FRESH_ROWS_MIN = 4


class PreparedRows(list):
    """prepare_rows()'s result: the rows, and for a message of distinct keys what merging it
    into a table that holds none of them takes, made once for every table (a batch create
    is 8 new MACs per message at each of 1,000 simulated agents): `fresh` key -> entry, the
    XOR of their hashes, their tombstone count and the applied `(key, None, entry)`, read-only."""

    __slots__ = ("fresh", "fresh_digest", "fresh_tombs", "fresh_applied")


def prepare_rows(updates: list) -> PreparedRows:
    """Gossip rows `[n, vlan, mac, host, port, seq, tombstone]` (validated), ready to merge."""
    rows = PreparedRows()
    rows.fresh = None
    for _n, vlan, mac, host, port, seq, tomb in updates:
        e = Entry(host, port, seq, tomb)
        rows.append(((vlan, mac), e, entry_hash(vlan, mac, e), seq, host, tomb))
    if len(rows) >= FRESH_ROWS_MIN:
        fresh = {r[0]: r[1] for r in rows}
        if len(fresh) == len(rows):
            rows.fresh = fresh
            digest = 0
            for r in rows:
                digest ^= r[2]
            rows.fresh_digest = digest
            rows.fresh_tombs = sum(r[5] for r in rows)
            rows.fresh_applied = tuple((r[0], None, r[1]) for r in rows)
    return rows


def format_mac(mac: int) -> str:
    return ":".join(f"{(mac >> s) & 0xFF:02x}" for s in range(40, -1, -8))


_HEX = frozenset("0123456789abcdefABCDEF")


def parse_mac(text: str) -> int:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in _HEX for c in p) for p in parts):
        raise ValueError(f"not a MAC address: {text!r} (expected six hex pairs like 02:00:00:00:00:01)")
    return int("".join(parts), 16)


class MergeResult(NamedTuple):
    applied: bool
    old: Entry | None


_NEW_KEY = MergeResult(True, None)


class MacTable:
    """The replicated table. `digest` is the XOR of entry hashes, kept current in O(1)."""

    def __init__(self, *, reverse_merge_rule: bool = False) -> None:
        self._entries: dict[Key, Entry] = {}
        self.digest = 0
        self._tombstones = 0  # kept current by merge: status reports must not scan the table
        # A deliberate defect for checker tests: accept lower (seq, host) instead of higher.
        self._reverse = reverse_merge_rule
        # Told (key, old, new) after every applied merge (the data plane keeps its flood lists so).
        self.observer: Callable[[Key, Entry | None, Entry], None] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def get(self, key: Key) -> Entry | None:
        return self._entries.get(key)

    def items(self):
        return self._entries.items()

    def live_count(self) -> int:
        return len(self._entries) - self._tombstones

    def wins(self, key: Key, new: Entry) -> bool:
        old = self._entries.get(key)
        if old is None:
            return True
        if self._reverse:
            return new.rank() < old.rank()
        return new.rank() > old.rank()

    def merge(self, key: Key, new: Entry) -> MergeResult:
        """Apply `new` iff it is greater than what we hold (the merge rule).

        The hot path of every agent (and of the simulator, a million times a run): the rank
        comparison is written out rather than built from rank() tuples."""
        entries = self._entries
        old = entries.get(key)
        if old is None:
            entries[key] = new
            if new.tombstone:
                self._tombstones += 1
            self.digest ^= entry_hash(key[0], key[1], new)
            if self.observer is not None:
                self.observer(key, None, new)
            return _NEW_KEY
        if self._reverse:
            if not (new.seq, new.host) < (old.seq, old.host):
                return MergeResult(False, old)
        elif new.seq < old.seq or (new.seq == old.seq and new.host <= old.host):
            return MergeResult(False, old)
        self.digest ^= entry_hash(key[0], key[1], old) ^ entry_hash(key[0], key[1], new)
        self._tombstones += new.tombstone - old.tombstone
        entries[key] = new
        if self.observer is not None:
            self.observer(key, old, new)
        return MergeResult(True, old)

    def merge_updates(self, updates: list) -> Sequence[tuple[Key, Entry | None, Entry]]:
        """Merge gossip rows `[n, vlan, mac, host, port, seq, tombstone]` by the same rule as
        merge(); return what was applied as `(key, old, new)`: a sequence the caller only
        reads (a message of new keys hands every table the same one)."""
        return self.merge_prepared(prepare_rows(updates))

    def merge_prepared(self, rows: list[PreparedRow]) -> Sequence[tuple[Key, Entry | None, Entry]]:
        """merge_updates() for rows already prepared (prepare_rows), in one loop.

        The bulk path: creating 8,000 VMs is 8,000 rows at every agent, and a call per row
        (merge, its result) costs more than the rule itself."""
        if self._reverse or type(self).merge is not MacTable.merge:
            return self._merge_one_by_one(rows)
        return self._merge_prepared_fast(rows)

    def _merge_prepared_fast(self, rows: list[PreparedRow]) -> Sequence[tuple[Key, Entry | None, Entry]]:
        entries = self._entries
        if type(rows) is PreparedRows and rows.fresh is not None and entries.keys().isdisjoint(rows.fresh):
            # Every key is new here: each row applies, in C.
            entries.update(rows.fresh)
            self.digest ^= rows.fresh_digest
            self._tombstones += rows.fresh_tombs
            applied = rows.fresh_applied
            if self.observer is not None:
                observer = self.observer
                for key, old, new in applied:
                    observer(key, old, new)
            return applied
        get = entries.get
        applied = []
        digest = self.digest
        tombs = 0
        for key, new, new_hash, seq, host, tomb in rows:
            old = get(key)
            if old is not None:
                if seq < old.seq or (seq == old.seq and host <= old.host):
                    continue
                digest ^= entry_hash(key[0], key[1], old)
                tombs -= old.tombstone
            entries[key] = new
            digest ^= new_hash
            tombs += tomb
            applied.append((key, old, new))
        self.digest = digest
        self._tombstones += tombs
        if self.observer is not None:
            observer = self.observer
            for key, old, new in applied:
                observer(key, old, new)
        return applied

    def _merge_one_by_one(self, rows: list[PreparedRow]) -> list[tuple[Key, Entry | None, Entry]]:
        applied = []
        for key, new, *_ in rows:
            ok, old = self.merge(key, new)
            if ok:
                applied.append((key, old, new))
        return applied

    def snapshot(self) -> list[list]:
        return [[k[0], k[1], e.host, e.port, e.seq, e.tombstone] for k, e in self._entries.items()]

    def as_placement(self) -> dict[Key, tuple[str, int, bool]]:
        """(vlan, mac) -> (host, seq, tombstone): what convergence is judged on."""
        return {k: (e.host, e.seq, e.tombstone) for k, e in self._entries.items()}
