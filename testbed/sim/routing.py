"""The simulator's route for an agent core's effects (agent/effects.py): where each one goes
on the simulated network, as agent/runtime.py sends it on real sockets.

One `match` ending in `typing.assert_never`: an effect this driver does not know is a type
error and an AssertionError, never a silent drop. Routing never calls back into a core.

Pure: no I/O, no clock, no randomness (tests/test_core_purity.py); the network's seeded
randomness stays in the engine's send paths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, assert_never

from agent.effects import Effect, Emit, Publish, Reply, Subscribe, ToController, ToPeer, Unsubscribe

if TYPE_CHECKING:
    from testbed.sim.engine import Agent, Simulator


def route_agent(sim: Simulator, a: Agent, out: list[Effect], t: int) -> None:
    """Route what agent `a`'s core emitted at virtual time `t`, in order; frames to the
    controller travel together (one flush over one connection)."""
    ctl_frames = None
    for effect in out:
        match effect:
            case Publish(frame):
                sim._publish(a, frame, t)
            case ToController(frame):
                if ctl_frames is None:
                    ctl_frames = [frame]
                else:
                    ctl_frames.append(frame)
            case ToPeer(host, frame):
                sim._request(a, host, frame, t)
            case Reply(envelope, frame):
                sim._reply(a, envelope, frame, t)
            case Subscribe(host, pub_endpoint, rpc_endpoint):
                _subscribe(sim, a, host, pub_endpoint, rpc_endpoint)
            case Unsubscribe(host):
                sim._disconnect(a, host)
            case Emit():
                pass  # (events are the real runtime's log; the simulator's output must not depend on them)
            case _:
                assert_never(effect)
    if ctl_frames is not None:
        sim._to_controller(a, ctl_frames, t)


def _subscribe(sim: Simulator, a: Agent, host: str, pub_endpoint: str, rpc_endpoint: str) -> None:
    sim._disconnect(a, host)
    # (one tuple per peer incarnation, shared by all who connect to it)
    pair = sim.endpoints.get(pub_endpoint)
    if pair is None or pair[1] != rpc_endpoint:
        pair = sim.endpoints[pub_endpoint] = (pub_endpoint, rpc_endpoint)
    a.conns[host] = pair
    s = sim.subs.get(pub_endpoint)
    if s is None:
        # The publisher is gone (or not there yet): a ZeroMQ connect would keep
        # retrying; this endpoint never comes back, so nothing will arrive.
        s = sim.subs[pub_endpoint] = {}
    s[a.iid] = a.hidx
