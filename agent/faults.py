"""Fault injection at the transport boundary, switchable at run time.

The core never sees this: the runtime asks `admit()` before handing a received gossip
frame to the core. Drop decisions come from a seeded RNG so a run can be replayed.
"""

from __future__ import annotations

import random

from agent.wire import MsgType


def peek_type(frame: bytes) -> int:
    """The msg_type of a frame `[1, type, body]` without decoding it (-1 if unusual)."""
    # 0x93 = fixarray of 3, then positive fixint schema version, then positive fixint type.
    if len(frame) >= 3 and frame[0] == 0x93 and frame[2] < 0x80:
        return frame[2]
    return -1


class NetFaults:
    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.rx_drop = 0.0  # probability of dropping a received gossip frame
        self.rx_drop_types: set[int] = {int(MsgType.UPDATES)}
        self.dropped = 0

    def configure(self, args: dict) -> dict:
        """Set faults from an API call; unknown keys are an error so typos do not pass silently."""
        known = {"rx_drop", "rx_drop_types", "seed"}
        unknown = set(args) - known
        if unknown:
            raise ValueError(f"unknown fault settings {sorted(unknown)}; known: {sorted(known)}")
        if "seed" in args:
            self.rng.seed(int(args["seed"]))
        if "rx_drop" in args:
            p = float(args["rx_drop"])
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"rx_drop must be a probability in [0, 1], got {p}")
            self.rx_drop = p
        if "rx_drop_types" in args:
            names = args["rx_drop_types"]
            if not isinstance(names, list):
                raise ValueError("rx_drop_types must be a list of message type names")
            try:
                self.rx_drop_types = {int(MsgType[str(n)]) for n in names}
            except KeyError as e:
                raise ValueError(f"unknown message type {e}") from None
        return self.describe()

    def describe(self) -> dict:
        return {
            "rx_drop": self.rx_drop,
            "rx_drop_types": sorted(MsgType(t).name for t in self.rx_drop_types),
            "dropped": self.dropped,
        }

    def admit(self, frame: bytes) -> bool:
        if self.rx_drop <= 0.0 or peek_type(frame) not in self.rx_drop_types:
            return True
        if self.rng.random() < self.rx_drop:
            self.dropped += 1
            return False
        return True
