"""Fault injection at the transport boundary, switchable at run time (the nemesis's hands).

The core never sees this: the runtime asks `plan()` for every frame it received and
delivers it zero, one or two times, now or later. Which peer a frame came from is read
off the frame or its envelope without decoding it. Decisions come from a seeded RNG so
a run can be replayed. A client of the API (dvs) is never faulted, so a cluster can
always be healed.
"""

from __future__ import annotations

import random

from agent.wire import MsgType

CONTROLLER = "controller"


def peek_type(frame: bytes) -> int:
    """The msg_type of a frame `[1, type, body]` without decoding it (-1 if unusual)."""
    # 0x93 = fixarray of 3, then positive fixint schema version, then positive fixint type.
    if len(frame) >= 3 and frame[0] == 0x93 and frame[2] < 0x80:
        return frame[2]
    return -1


def peek_origin(frame: bytes) -> str | None:
    """The origin host of a gossip frame (HEARTBEAT / UPDATES: the body starts with it)."""
    # [0x93, version, type, 0x9N (body array), 0xa0|len (fixstr), origin...]
    if len(frame) > 5 and frame[0] == 0x93 and 0x90 <= frame[3] <= 0x9F and 0xA0 <= frame[4] <= 0xBF:
        n = frame[4] & 0x1F
        try:
            return frame[5 : 5 + n].decode()
        except UnicodeDecodeError:
            return None
    return None


def host_of_identity(identity: bytes) -> str | None:
    """Which host a ROUTER identity belongs to: b"pull:h3" (a peer's repair socket) or
    b"h3#7" (our connection to h3). Anything else is a client, e.g. dvs."""
    text = identity.decode(errors="replace")
    if text.startswith("pull:"):
        return text[5:]
    if "#" in text:
        return text.split("#", 1)[0]
    return None


class NetFaults:
    KNOWN = ("drop", "delay_ms", "jitter_ms", "dup", "reorder", "blocked", "peers", "drop_types", "seed")

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.reset()
        self.dropped = 0
        self.delayed = 0
        self.duplicated = 0

    def reset(self) -> None:
        self.drop = 0.0  # probability a received frame is lost
        self.delay_ms = 0.0  # added to every received frame, in ms
        self.jitter_ms = 0.0  # plus uniform 0..jitter_ms, in ms
        self.dup = 0.0  # probability a received frame is delivered twice
        self.reorder = 0.0  # probability a frame is held back (1..5 x (delay + jitter + 1) ms) so later ones pass it
        self.blocked: set[str] = set()  # hosts (or "controller") we neither hear nor send to: a partition
        self.peers: set[str] | None = None  # the hosts drop/delay/dup/reorder apply to (None: all)
        self.drop_types: set[int] | None = None  # message types `drop` applies to (None: all)

    @property
    def active(self) -> bool:
        return bool(self.drop or self.delay_ms or self.jitter_ms or self.dup or self.reorder or self.blocked)

    def configure(self, args: dict) -> dict:
        """Set faults from an API call. `{"reset": true}` heals everything; other keys are
        changed one by one. Unknown keys are an error so typos do not pass silently."""
        args = dict(args)
        if args.pop("reset", False):
            self.reset()
        unknown = set(args) - set(self.KNOWN)
        if unknown:
            raise ValueError(f"unknown fault settings {sorted(unknown)}; known: {', '.join(self.KNOWN)}")
        if "seed" in args:
            self.rng.seed(int(args["seed"]))
        for name in ("drop", "dup", "reorder"):
            if name in args:
                p = float(args[name])
                if not 0.0 <= p <= 1.0:
                    raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
                setattr(self, name, p)
        for name in ("delay_ms", "jitter_ms"):
            if name in args:
                v = float(args[name])
                if not 0.0 <= v <= 60_000:
                    raise ValueError(f"{name} must be in [0, 60000] ms, got {v}")
                setattr(self, name, v)
        if "blocked" in args:
            self.blocked = {str(h) for h in _as_list(args["blocked"], "blocked")}
        if "peers" in args:
            self.peers = None if args["peers"] is None else {str(h) for h in _as_list(args["peers"], "peers")}
        if "drop_types" in args:
            if args["drop_types"] is None:
                self.drop_types = None
            else:
                try:
                    self.drop_types = {int(MsgType[str(n)]) for n in _as_list(args["drop_types"], "drop_types")}
                except KeyError as e:
                    raise ValueError(f"unknown message type {e}") from None
        return self.describe()

    def describe(self) -> dict:
        return {
            "drop": self.drop, "delay_ms": self.delay_ms, "jitter_ms": self.jitter_ms, "dup": self.dup,
            "reorder": self.reorder, "blocked": sorted(self.blocked),
            "peers": None if self.peers is None else sorted(self.peers),
            "drop_types": None if self.drop_types is None else sorted(MsgType(t).name for t in self.drop_types),
            "dropped": self.dropped, "delayed": self.delayed, "duplicated": self.duplicated,
        }

    def plan(self, peer: str | None, frame: bytes) -> list[float]:
        """Delivery delays in seconds for one received frame: [] drops it, [0.0] is now."""
        if peer is None:
            return [0.0]  # a client (dvs): never faulted
        if peer in self.blocked:
            self.dropped += 1
            return []
        if self.peers is not None and peer not in self.peers:
            return [0.0]
        rng = self.rng
        if self.drop and (self.drop_types is None or peek_type(frame) in self.drop_types) and rng.random() < self.drop:
            self.dropped += 1
            return []
        copies = 2 if self.dup and rng.random() < self.dup else 1
        if copies == 2:
            self.duplicated += 1
        out = []
        for _ in range(copies):
            d = self.delay_ms + (rng.random() * self.jitter_ms if self.jitter_ms else 0.0)
            if self.reorder and rng.random() < self.reorder:
                d += rng.randint(1, 5) * (self.delay_ms + self.jitter_ms + 1.0)
            if d:
                self.delayed += 1
            out.append(d / 1000.0)
        return out

    def may_send(self, peer: str) -> bool:
        return peer not in self.blocked


def _as_list(v, name: str) -> list:
    if not isinstance(v, list):
        raise ValueError(f"{name} must be a list of host names")
    return v
