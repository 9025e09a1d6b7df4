"""The tests' one route for an agent core's effects (agent/effects.py), as the runtime and the
simulator each have theirs: exhaustive, so a new effect fails every test router at once."""

from __future__ import annotations

from typing import Protocol, assert_never

from agent.effects import Effect, Emit, Publish, Reply, Subscribe, ToController, ToPeer, Unsubscribe


class Router(Protocol):
    """What a test harness does with each effect of the core of host `src`."""

    def publish(self, src: str, frame: bytes) -> None: ...
    def to_peer(self, src: str, host: str, frame: bytes) -> None: ...
    def reply(self, src: str, envelope: object, frame: bytes) -> None: ...
    def to_controller(self, src: str, frame: bytes) -> None: ...
    def subscribe(self, src: str, host: str, pub_endpoint: str, rpc_endpoint: str) -> None: ...
    def unsubscribe(self, src: str, host: str) -> None: ...
    def emit(self, src: str, event: dict) -> None: ...


def route(router: Router, src: str, effect: Effect) -> None:
    match effect:
        case Publish(frame):
            router.publish(src, frame)
        case ToPeer(host, frame):
            router.to_peer(src, host, frame)
        case Reply(envelope, frame):
            router.reply(src, envelope, frame)
        case ToController(frame):
            router.to_controller(src, frame)
        case Subscribe(host, pub_endpoint, rpc_endpoint):
            router.subscribe(src, host, pub_endpoint, rpc_endpoint)
        case Unsubscribe(host):
            router.unsubscribe(src, host)
        case Emit(event):
            router.emit(src, event)
        case _:
            assert_never(effect)
