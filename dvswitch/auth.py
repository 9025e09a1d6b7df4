"""Authentication (CurveZMQ + ZAP) and the counters of what it refused, for every runtime.

ZAP runs once per connection, in the handshake; afterwards each message carries the connection's
User-Id (the role the handler gave its key: dvswitch/keys.py), which a ROUTER reads per message
with `frame.get("User-Id")`. A SUB or DEALER that connects pins its server's public key, so what
it receives is known to come from that server without a per-message check.

Counted here, per process: `auth_failures` (a handshake that failed: an unknown key, no CURVE,
a wrong server key; from socket monitors on the bound sockets) and `forbidden` (an
authenticated peer that sent something its role may not send). At most one log line per peer
and minute.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import zmq
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from dvswitch import keys

# Largest CURVE handshake command a peer sends (INITIATE: cookie, vouch box and the metadata
# box with Socket-Type and Identity, ~300 bytes), in bytes: a socket whose ZMQ_MAXMSGSIZE is
# below it (a PUB's, made for 256-byte subscriptions) would refuse every handshake.
HANDSHAKE_MAX_BYTES = 1024
LOG_EVERY_S = 60.0  # one log line per peer and reason at most this often
_LOG_PEERS_MAX = 4096  # peers remembered for rate limiting; the oldest is forgotten first

HANDSHAKE_FAILED = (int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL) | int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
                    | int(zmq.EVENT_HANDSHAKE_FAILED_AUTH))


class RateLimitedLog:
    def __init__(self, log: logging.Logger, every_s: float = LOG_EVERY_S) -> None:
        self.log = log
        self.every_s = every_s
        self._last: dict[str, float] = {}

    def warning(self, peer: str, msg: str, *args) -> None:
        now = time.monotonic()
        last = self._last.get(peer)
        if last is not None and now - last < self.every_s:
            return
        if last is None and len(self._last) >= _LOG_PEERS_MAX:
            del self._last[next(iter(self._last))]
        self._last[peer] = now
        self.log.warning(msg, *args)


class Guard:
    """A process's authentication state: its key pair, the ring of accepted keys, the ZAP
    handler, the monitors of its bound sockets and the two counters."""

    def __init__(self, ctx: zmq.Context, key_dir: str, me: str, log: logging.Logger) -> None:
        self.ctx = ctx
        self.ring = keys.KeyRing(key_dir)
        self.me = me
        self.pair = keys.load_pair(self.ring.dir, me)
        self.auth_failures = 0
        self.forbidden = 0
        self.forbidden_by: dict[str, int] = {}  # role (or "unknown") -> count
        self.rlog = RateLimitedLog(log)
        self.log = log
        self._zap: _Zap | None = None
        self._monitors: list[tuple[zmq.Socket, zmq.Socket]] = []
        # The process's event log (dvswitch/events.py), set by the runtime once it has one:
        # auth.failed / auth.forbidden, rate-limited per peer as the log lines are.
        self.events = None

    # ---- sockets

    def start(self) -> None:
        """Bind the process's ZAP handler (inproc://zeromq.zap.01) on the running asyncio loop."""
        self._zap = _Zap(self)
        self._zap.start()

    def server(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE server (before bind): peers must present an accepted key."""
        sock.curve_secretkey = self.pair.secret
        sock.curve_publickey = self.pair.public
        sock.curve_server = True
        sock.zap_domain = b"dvswitch"

    def client(self, sock: zmq.Socket, server_public: bytes) -> None:
        """Make `sock` a CURVE client (before connect) that talks only to the holder of `server_public`."""
        sock.curve_secretkey = self.pair.secret
        sock.curve_publickey = self.pair.public
        sock.curve_serverkey = server_public

    def server_key(self, name: str) -> bytes | None:
        """The public key `name` uses now (re-reading the directory if it changed)."""
        self.ring.maybe_reload()
        return self.ring.current.get(name)

    def monitor(self, sock: zmq.Socket, what: str, add_reader: Callable[[zmq.Socket, Callable], object]) -> None:
        """Count the handshakes that fail on `sock` (a bound socket): `add_reader(mon, handle)`
        drains the monitor socket into handle(frames) on the caller's loop."""
        mon = sock.get_monitor_socket(HANDSHAKE_FAILED)
        self._monitors.append((sock, mon))
        add_reader(mon, lambda frames: self._on_monitor(what, frames))

    def _on_monitor(self, what: str, frames: list[bytes]) -> None:
        try:
            ev = parse_monitor_message(frames)
        except (ValueError, IndexError, TypeError):
            return
        self.auth_failures += 1
        kind = {int(zmq.EVENT_HANDSHAKE_FAILED_AUTH): "its key was refused",
                int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL): "no CURVE or a broken handshake"}.get(
                    int(ev["event"]), "handshake failed")
        self.rlog.warning(f"{what}:{kind}", "authentication failed on the %s socket (%s): %s; "
                          "%d failures so far", what, ev.get("endpoint", b"?"), kind, self.auth_failures)
        if self.events is not None:
            self.events.limited("auth.failed", f"{what}:{kind}", socket=what, reason=kind, total=self.auth_failures,
                                message=f"authentication failed on the {what} socket: {kind} "
                                        f"({self.auth_failures} so far)")

    def refuse(self, role: str | None, what: str) -> None:
        """An authenticated peer sent something its role may not: drop (the caller) and count."""
        self.forbidden += 1
        who = role or "unknown"
        self.forbidden_by[who] = self.forbidden_by.get(who, 0) + 1
        self.rlog.warning(f"forbidden:{who}", "dropped %s from %s: not allowed for that role "
                          "(%d forbidden so far)", what, who, self.forbidden)
        if self.events is not None:
            self.events.limited("auth.forbidden", who, role=who, what=what, total=self.forbidden,
                                message=f"dropped {what} from {who}: not allowed for that role "
                                        f"({self.forbidden} so far)")

    def reload(self) -> None:
        if self.ring.maybe_reload():
            self.log.info("key ring re-read: %d keys accepted (digest %s)", len(self.ring.roles), self.ring.digest())

    def status(self) -> dict:
        return {"curve": True, "key": self.me, "fingerprint": keys.fingerprint(self.pair.public),
                "keys_accepted": len(self.ring.roles), "keyring_digest": self.ring.digest(),
                "auth_failures": self.auth_failures, "forbidden": self.forbidden,
                "forbidden_by_role": dict(self.forbidden_by)}

    def close(self) -> None:
        for sock, mon in self._monitors:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            mon.close(linger=0)
        self._monitors = []
        if self._zap is not None:
            self._zap.stop()
            self._zap = None


def insecure_status() -> dict:
    return {"curve": False, "auth_failures": 0, "forbidden": 0}


def metrics(prefix: str, st: dict) -> list:
    """Prometheus counters for `st` (Guard.status() or insecure_status())."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    out = [GaugeMetricFamily(f"{prefix}_curve_enabled", "1 when this process's sockets use CURVE.",
                             value=1 if st["curve"] else 0)]
    out.append(CounterMetricFamily(f"{prefix}_auth_failures", "Handshakes refused: unknown key, no CURVE, "
                                   "wrong server key.", value=st["auth_failures"]))
    forbidden = CounterMetricFamily(f"{prefix}_forbidden", "Messages dropped because the sender's role may "
                                    "not send them, by role.", labels=["role"])
    for role, n in (st.get("forbidden_by_role") or {}).items():
        forbidden.add_metric([role], n)
    out.append(forbidden)
    return out


class _Zap(AsyncioAuthenticator):
    """pyzmq's ZAP handler with our key ring as the credentials callback and the key's role as
    the User-Id. An unknown key is logged (per key and minute) here, counted by the monitors."""

    def __init__(self, guard: Guard) -> None:
        super().__init__(guard.ctx, log=logging.getLogger("zmq.auth"))
        self.guard = guard
        self.configure_curve_callback("dvswitch", self)

    def callback(self, domain: str, key_z85: bytes) -> bool:
        ring = self.guard.ring
        if key_z85 not in ring.roles:
            ring.maybe_reload()  # a key installed a moment ago (a new host, a rotation)
        if key_z85 in ring.roles:
            return True
        self.guard.rlog.warning(f"key:{key_z85!r}", "refused a connection with unknown key %s",
                                keys.fingerprint(key_z85))
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.guard.ring.role(z85.encode(client_public_key)) or "unknown"


# ---- authorization helpers: the message type of a frame without decoding it


def peek_type(frame: bytes) -> int | None:
    """The msg_type of a frame packed as wire.encode packs it ([version, type, body] with both
    as positive fixints: 0x93 v t ...), or None for any other layout (which a restricted role
    may not use: a non-canonical encoding must not slip past the check)."""
    if len(frame) >= 3 and frame[0] == 0x93 and frame[1] < 0x80 and frame[2] < 0x80:
        return frame[2]
    return None
