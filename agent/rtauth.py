"""AgentRuntime's CURVE side (dvswitch/auth.py, dvswitch/keys.py): the guard that authenticates
every connection (ZAP), the role gate on the rpc socket, the key directory's reload, and the
auth counters and status the `auth` API call and the metrics report.

A mixin of AgentRuntime (agent/runtime.py), so the code moved here unchanged; the attributes
it reads from the runtime are declared below."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import zmq

from agent.wire import MsgType
from dvswitch import auth, keys
from dvswitch.bus import Reader

log = logging.getLogger("agent")

KEY_RELOAD_S = 1.0  # how often the key directory is checked for a rotation (one stat())
RPC_FROM_HOSTS = frozenset({int(MsgType.PULL_REQ), int(MsgType.SNAPSHOT_REQ)})  # a peer's repair requests


class RuntimeAuth:
    # Set by AgentRuntime: its host, key directory (None: no CURVE), ZeroMQ context, loop,
    # readers (monitors join them, to be closed with them), and its rpc socket and handler.
    host: str
    keys_dir: str | None
    guard: auth.Guard | None
    ctx: zmq.Context
    loop: asyncio.AbstractEventLoop
    readers: list[Reader]
    pub: zmq.Socket
    rpc: zmq.Socket
    _on_rpc: Callable[[list[bytes]], None]
    _key_timer: asyncio.TimerHandle
    _ctl_key: bytes | None
    _reconnect_ctl: Callable[[bytes], None]

    def _start_guard(self) -> tuple[auth.Guard | None, bytes | None]:
        """With a key directory: the guard, started, and the controller's public key (what the
        ctl and pull sockets authenticate their servers with at first); else (None, None)."""
        if self.keys_dir is None:
            return None, None
        # (ValueError: a missing key directory or key file; agent/__main__ reports it)
        guard = self.guard = auth.Guard(self.ctx, self.keys_dir, self.host, log)
        ctl_key = guard.server_key(keys.CONTROLLER)
        if ctl_key is None:
            raise ValueError(f"no controller key ({keys.CONTROLLER}.key) in {self.keys_dir}")
        guard.start()
        return guard, ctl_key

    def _watch_auth(self, guard: auth.Guard) -> None:
        """Once the sockets are bound: count their handshakes (monitors), and reload the keys."""
        for sock, what in ((self.pub, "gossip"), (self.rpc, "rpc")):
            guard.monitor(sock, what, self._add_monitor)
        self._key_timer = self.loop.call_later(KEY_RELOAD_S, self._reload_keys)

    # ---- roles per connection, checked per rpc message

    def _add_monitor(self, mon: zmq.Socket, handle) -> None:
        r = Reader(self.loop, mon, handle, _nothing)
        r.kick()  # (a pipe signals new input only after a read found it empty: arm it)
        self.readers.append(r)

    def _reload_keys(self) -> None:
        self.guard.reload()
        ctl_key = self.guard.server_key(keys.CONTROLLER)
        if ctl_key is not None and ctl_key != self._ctl_key:
            self._reconnect_ctl(ctl_key)
        self._key_timer = self.loop.call_later(KEY_RELOAD_S, self._reload_keys)

    def _api_auth(self, args: dict) -> dict:
        return self.guard.status() if self.guard is not None else auth.insecure_status()

    def _on_rpc_auth(self, frames: list[bytes], role: str | None) -> None:
        """The rpc socket with CURVE: the admin (`dvs`) may call anything (API, faults, headless
        claims); a host may only ask for repair (pull and snapshot requests); nobody else
        reaches this socket (ZAP), and the controller's key has no business here."""
        if role != keys.ADMIN:
            mt = auth.peek_type(frames[-1]) if len(frames) >= 2 else None
            if keys.host_of_role(role) is None or mt not in RPC_FROM_HOSTS:
                self.guard.refuse(role, f"a {_type_name(mt)} on the rpc socket")
                return
        self._on_rpc(frames)


def _type_name(mt: int | None) -> str:
    try:
        return MsgType(mt).name
    except ValueError:
        return "message that is not well-formed"


def _nothing() -> None:
    pass
