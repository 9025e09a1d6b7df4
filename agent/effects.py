"""What the agent core asks its driver to do: one frozen value per effect.

The core returns a list of these from `AgentCore.end_batch` / `take_outbox`; every driver
(agent/runtime.py, testbed/sim/routing.py, the tests' router) routes them with one `match`
that ends in `typing.assert_never`, so an effect a driver does not know is a type error
(mypy/pyright) and an AssertionError at run time, never a silent drop.

Effects carry plain values only: no core object (a PeerState, the table) leaves the core, so a
driver cannot change the core's state behind its back.

Pure: no I/O, no clock, no randomness (tests/test_core_purity.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Publish:
    """Send `frame` on our PUB socket, to every subscriber (gossip: heartbeats, updates)."""

    frame: bytes


@dataclass(frozen=True, slots=True)
class ToPeer:
    """Send `frame` to `host`'s rpc socket (a repair request: pull or snapshot)."""

    host: str
    frame: bytes


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer a request that came in on our rpc socket, back along its routing `envelope`
    (the list of identity frames the driver handed to on_frame)."""

    envelope: object
    frame: bytes


@dataclass(frozen=True, slots=True)
class ToController:
    """Send `frame` to the controller (register, status, acks, apply reports, replies)."""

    frame: bytes


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Membership admitted `host` (or it moved to new endpoints): subscribe to its publisher
    and route repair requests to its rpc socket, dropping any older connection to it."""

    host: str
    pub_endpoint: str
    rpc_endpoint: str


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """`host` left the membership: drop our subscription and rpc route to it."""

    host: str


@dataclass(frozen=True, slots=True)
class Emit:
    """A structured event `{"kind": "<dotted.kind>", ...fields}` (no timestamps: the driver
    stamps them; an optional "message" is the human log line). Kinds from the agent core:
    `repair.pull {peer, lo, hi}` (a pull asked of `peer`), `repair.snapshot {peer, entries,
    applied}` (a snapshot taken from `peer`: its size, how many entries it changed here),
    `flap.suppressed {vlan, mac, host, moves, window_ms}` (a MAC moved more than flap_moves
    times within the window: reported, not acted on)."""

    event: dict


Effect = Publish | ToPeer | Reply | ToController | Subscribe | Unsubscribe | Emit
