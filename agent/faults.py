"""Fault injection at the transport boundary, switchable at run time (the nemesis's hands).

The core never sees this: the runtime asks `plan()` for every frame it received and
delivers it zero, one or two times, now or later. Which peer a frame came from is read
off the frame or its envelope without decoding it. Decisions come from a seeded RNG so
a run can be replayed. A client of the API (dvs) is never faulted, so a cluster can
always be healed.

One fault model, shared with the kernel rules of testbed/kernfaults.py: a fault is a `Rule`
(one kind, its own peers and message types, an id given by whoever adds it), and rules are
independent: a delay added later leaves an earlier loss alone. A partition is the `blocked`
set beside them. `configure` validates a whole call before it changes anything.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from agent.wire import MsgType

CONTROLLER = "controller"
RULE_KINDS = ("loss", "delay", "dup", "reorder")
MAX_DELAY_MS = 60_000.0
MAX_RULES = 64  # per agent: bounded like everything else that comes from outside


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


# ---------------------------------------------------------------------- one rule


@dataclass(frozen=True)
class Rule:
    """One network fault on what an agent receives.

    kind: loss | delay | dup | reorder.
    p: probability in [0, 1] that a matching frame is lost / duplicated / held back (loss, dup, reorder).
    delay_ms, jitter_ms: delay = delay_ms + uniform(0, jitter_ms), in ms, each in [0, 60000] (delay).
    peers: only frames from these hosts (or "controller"); None: from everyone.
    types: only these message types (MsgType values); None: every type.
    """

    id: str
    kind: str
    p: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    peers: frozenset[str] | None = None
    types: frozenset[int] | None = None

    def to_json(self) -> dict:
        d: dict = {"id": self.id, "kind": self.kind}
        if self.kind == "delay":
            d |= {"delay_ms": self.delay_ms, "jitter_ms": self.jitter_ms}
        else:
            d["p"] = self.p
        d["from"] = None if self.peers is None else sorted(self.peers)
        d["types"] = None if self.types is None else sorted(MsgType(t).name for t in self.types)
        return d

    def matches(self, peer: str, frame: bytes) -> bool:
        return (self.peers is None or peer in self.peers) and (self.types is None or peek_type(frame) in self.types)


def _prob(v, name: str) -> float:
    try:
        p = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a probability in [0, 1], got {v!r}") from None
    if not 0.0 <= p <= 1.0:  # (NaN fails this too)
        raise ValueError(f"{name} must be a probability in [0, 1], got {p:g}")
    return p


def _ms(v, name: str) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be in [0, {MAX_DELAY_MS:g}] ms, got {v!r}") from None
    if not (math.isfinite(x) and 0.0 <= x <= MAX_DELAY_MS):
        raise ValueError(f"{name} must be in [0, {MAX_DELAY_MS:g}] ms, got {x:g}")
    return x


def _names(v, name: str) -> frozenset[str] | None:
    if v is None:
        return None
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        raise ValueError(f"{name} must be a non-empty list of host names (or null for all)")
    return frozenset(v)


def _types(v, name: str = "types") -> frozenset[int] | None:
    if v is None:
        return None
    if not isinstance(v, list) or not v:
        raise ValueError(f"{name} must be a non-empty list of message type names (or null for all)")
    try:
        return frozenset(int(MsgType[str(n)]) for n in v)
    except KeyError as e:
        raise ValueError(f"unknown message type {e} in {name}; known: {', '.join(t.name for t in MsgType)}") from None


RULE_KEYS = {"id", "kind", "p", "delay_ms", "jitter_ms", "from", "types"}


def parse_rule(d) -> Rule:
    """A rule from its JSON form (as `Rule.to_json` writes it); any problem is one ValueError line."""
    if not isinstance(d, dict):
        raise ValueError("a fault rule must be a table {id, kind, ...}")
    unknown = set(d) - RULE_KEYS
    if unknown:
        raise ValueError(f"unknown rule fields {sorted(unknown)}; known: {', '.join(sorted(RULE_KEYS))}")
    rid, kind = d.get("id"), d.get("kind")
    if not isinstance(rid, str) or not rid or len(rid) > 32:
        raise ValueError(f"a rule needs an id (a string of 1..32 characters), got {rid!r}")
    if kind not in RULE_KINDS:
        raise ValueError(f"rule {rid}: kind must be one of {', '.join(RULE_KINDS)}, got {kind!r}")
    peers, types = _names(d.get("from"), "from"), _types(d.get("types"))
    if kind == "delay":
        if "p" in d:
            raise ValueError(f"rule {rid}: a delay takes delay_ms and jitter_ms, not p")
        return Rule(rid, kind, delay_ms=_ms(d.get("delay_ms", 0), "delay_ms"),
                    jitter_ms=_ms(d.get("jitter_ms", 0), "jitter_ms"), peers=peers, types=types)
    if "delay_ms" in d or "jitter_ms" in d:
        raise ValueError(f"rule {rid}: a {kind} takes p, not delay_ms/jitter_ms")
    if "p" not in d:
        raise ValueError(f"rule {rid}: a {kind} needs p, a probability in [0, 1]")
    return Rule(rid, kind, p=_prob(d["p"], "p"), peers=peers, types=types)


# ---------------------------------------------------------------------- an agent's faults


# The flat settings of the first API (`{"drop": 0.3, "peers": [...]}`) still work: each names
# the rule of its kind whose id is the kind's name, so a flat call replaces only that rule.
FLAT = {"drop": "loss", "delay_ms": "delay", "jitter_ms": "delay", "dup": "dup", "reorder": "reorder"}


class NetFaults:
    KNOWN = ("add", "remove", "reset", "blocked", "seed", *FLAT, "peers", "drop_types")

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.rules: dict[str, Rule] = {}  # in the order they were added
        self.blocked: set[str] = set()  # hosts (or "controller") we neither hear nor send to: a partition
        # Any rule or partition in force: read on every frame the agent takes, so kept as a plain
        # attribute (rules and blocked change only in configure and reset).
        self.active = False
        self.hits: dict[str, int] = {}  # rule id -> frames it acted on
        self.dropped = 0
        self.delayed = 0
        self.duplicated = 0

    def reset(self) -> None:
        self.rules.clear()
        self.hits.clear()
        self.blocked.clear()
        self.active = False

    def configure(self, args: dict) -> dict:
        """Change faults from an API call, all or nothing:
        `{"reset": true}` heals everything first; `{"remove": [ids]}` drops rules;
        `{"add": [rule, ...]}` adds rules (one with the id of a rule in force replaces it);
        `{"blocked": [hosts]}` sets the partition; `{"seed": n}` reseeds the RNG.
        The flat form `{"drop": p, "drop_types": [...], "peers": [...]}` (likewise delay_ms +
        jitter_ms, dup, reorder) sets the rule named after its kind; 0 removes it.
        Unknown keys are an error so typos do not pass silently."""
        if not isinstance(args, dict):
            raise ValueError("fault settings must be a table")
        unknown = set(args) - set(self.KNOWN)
        if unknown:
            raise ValueError(f"unknown fault settings {sorted(unknown)}; known: {', '.join(self.KNOWN)}")
        # ---- validate everything into new values; nothing changes until all of it passed
        rules = {} if args.get("reset") else dict(self.rules)
        blocked = set() if args.get("reset") else set(self.blocked)
        remove = args.get("remove", [])
        if not isinstance(remove, list) or not all(isinstance(r, str) for r in remove):
            raise ValueError("remove must be a list of rule ids")
        for rid in remove:
            rules.pop(rid, None)
        added = args.get("add", [])
        if not isinstance(added, list) or len(added) > MAX_RULES:
            raise ValueError(f"add must be a list of at most {MAX_RULES} rules")
        new = [parse_rule(d) for d in added]
        new += self._flat_rules(args, rules)
        for r in new:
            rules.pop(r.id, None)  # a replaced rule goes to the end: rules apply in the order added
            rules[r.id] = r
        if len(rules) > MAX_RULES:
            raise ValueError(f"at most {MAX_RULES} fault rules per agent, this call would make {len(rules)}")
        if "blocked" in args:
            b = args["blocked"]
            if not isinstance(b, list) or not all(isinstance(h, str) for h in b):
                raise ValueError("blocked must be a list of host names")
            blocked = set(b)
        seed = None
        if "seed" in args:
            if type(args["seed"]) is not int:
                raise ValueError(f"seed must be an integer, got {args['seed']!r}")
            seed = args["seed"]
        # ---- apply
        if seed is not None:
            self.rng.seed(seed)
        self.rules, self.blocked = rules, blocked
        self.active = bool(rules or blocked)
        fresh = {r.id for r in new}
        self.hits = {rid: 0 if rid in fresh else self.hits.get(rid, 0) for rid in rules}
        return self.describe()

    @staticmethod
    def _flat_rules(args: dict, rules: dict[str, Rule]) -> list[Rule]:
        """Rules for the flat settings in `args`; a flat setting of 0 removes its rule from `rules`."""
        kinds = {FLAT[k] for k in args if k in FLAT}
        if not kinds:
            if "peers" in args or "drop_types" in args:
                raise ValueError("peers and drop_types go with drop, delay_ms, dup or reorder")
            return []
        if "drop_types" in args and "loss" not in kinds:
            raise ValueError("drop_types goes with drop")
        peers = _names(args.get("peers"), "peers")
        out = []
        for kind in RULE_KINDS:
            if kind not in kinds:
                continue
            if kind == "delay":
                d, j = _ms(args.get("delay_ms", 0), "delay_ms"), _ms(args.get("jitter_ms", 0), "jitter_ms")
                rule = Rule(kind, kind, delay_ms=d, jitter_ms=j, peers=peers) if d or j else None
            else:
                p = _prob(args[{"loss": "drop"}.get(kind, kind)], {"loss": "drop"}.get(kind, kind))
                types = _types(args.get("drop_types"), "drop_types") if kind == "loss" else None
                rule = Rule(kind, kind, p=p, peers=peers, types=types) if p else None
            if rule is None:
                rules.pop(kind, None)
            else:
                out.append(rule)
        return out

    def describe(self) -> dict:
        return {
            "rules": [r.to_json() | {"hits": self.hits.get(r.id, 0)} for r in self.rules.values()],
            "blocked": sorted(self.blocked),
            "dropped": self.dropped, "delayed": self.delayed, "duplicated": self.duplicated,
        }

    def plan(self, peer: str | None, frame: bytes) -> list[float]:
        """Delivery delays in seconds for one received frame: [] drops it, [0.0] is now.
        Rules act independently: every loss rule that matches may drop it, every dup rule may
        add a copy, and each copy gets the sum of the matching delays (and maybe a hold-back)."""
        if peer is None:
            return [0.0]  # a client (dvs): never faulted
        if peer in self.blocked:
            self.dropped += 1
            return []
        rng = self.rng
        hits = self.hits
        delays: list[Rule] = []
        holds: list[Rule] = []
        copies = 1
        for r in self.rules.values():
            if not r.matches(peer, frame):
                continue
            if r.kind == "loss":
                if rng.random() < r.p:
                    hits[r.id] += 1
                    self.dropped += 1
                    return []
            elif r.kind == "dup":
                if rng.random() < r.p:
                    hits[r.id] += 1
                    copies += 1
            elif r.kind == "delay":
                delays.append(r)
            else:
                holds.append(r)
        if copies > 1:
            self.duplicated += copies - 1
        out = []
        for _ in range(copies):
            d = 0.0
            for r in delays:
                d += r.delay_ms + (rng.random() * r.jitter_ms if r.jitter_ms else 0.0)
                hits[r.id] += 1
            for r in holds:
                if rng.random() < r.p:
                    hits[r.id] += 1
                    d += rng.randint(1, 5) * (d + 1.0)
            if d:
                self.delayed += 1
            out.append(d / 1000.0)
        return out

    def may_send(self, peer: str) -> bool:
        return peer not in self.blocked
