"""A blocking request/reply client for the controller's and agents' API sockets."""

from __future__ import annotations

import itertools
import time

import zmq

from agent import wire
from agent.wire import MsgType, WireError


def set_curve_client(sock: zmq.Socket, pair, server_public: bytes) -> None:
    """Make `sock` (before connect) a CURVE client with `pair` that talks only to `server_public`."""
    sock.curve_secretkey = pair.secret
    sock.curve_publickey = pair.public
    sock.curve_serverkey = server_public


class ClusterError(Exception):
    """Something the user can act on: printed as one line by `dvs`."""


class Client:
    """One DEALER socket to one endpoint; each call waits for the reply with its own id."""

    _ids = itertools.count(1)

    def __init__(self, endpoint: str, *, name: str = "", timeout_ms: int = 5_000,
                 curve: tuple | None = None) -> None:
        """`curve`: (our KeyPair, the server's public key) to speak CURVE (dvswitch/keys.py); None: plain."""
        self.endpoint = endpoint
        self.name = name or endpoint
        self.timeout_ms = timeout_ms
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            set_curve_client(self.sock, *curve)
        self.sock.connect(endpoint)

    def call(self, method: str, args: dict | None = None, *, timeout_ms: int | None = None):
        req_id = next(self._ids)
        self.sock.send(wire.encode(MsgType.REQUEST, [req_id, method, args or {}]))
        timeout = self.timeout_ms if timeout_ms is None else timeout_ms
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        deadline = time.monotonic() + timeout / 1000
        while True:
            left_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not poller.poll(left_ms):
                raise ClusterError(f"{self.name} did not answer {method!r} within {timeout} ms; is it running?")
            frame = self.sock.recv(zmq.NOBLOCK)
            try:
                mt, body = wire.decode(frame)
            except WireError:
                continue
            if mt is not MsgType.REPLY or body[0] != req_id:
                continue  # a late answer to an earlier call that timed out
            _, ok, result = body
            if not ok:
                raise ClusterError(str(result))
            return result

    def close(self) -> None:
        self.sock.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
