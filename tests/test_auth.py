"""CURVE and roles on a running cluster (issue 13): outsiders (a fresh key pair; no CURVE at all)
get nothing and change nothing, a member's key outside its role is forbidden, a host whose key
was replaced cannot rejoin; every refusal is counted and every process stays alive."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import psutil
import pytest
import zmq

from agent import wire
from agent.wire import MsgType
from dvswitch import auth, keys
from testbed import procs
from testbed.client import Client, ClusterError, set_curve_client
from testbed.hostile import BIG_SEQ

BOGUS = "evil"


def alive(cluster) -> bool:
    pids = [p.pid for p in cluster.agents.values()] + [cluster.controller.pid]
    return all(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def counters(cluster) -> dict[str, dict]:
    out = {}
    with cluster.controller_client() as ctl:
        out["controller"] = ctl.call("auth")
    for h in cluster.agents:
        with cluster.agent_client(h) as a:
            out[h] = a.call("auth")
    return out


def wait_for(pred, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def tables(cluster, mac: int, vlan: int) -> dict:
    out = {}
    for h in cluster.agents:
        with cluster.agent_client(h) as a:
            e = a.call("lookup", {"vlan": vlan, "mac": mac})
        out[h] = None if e is None else (e["host"], e["seq"])
    return out


def vm1(cluster) -> dict:
    with cluster.controller_client() as ctl:
        v = next(v for v in ctl.call("vm_list")["vms"] if v["vm"] == "vm1")
    return {"host": v["host"], "vlan": v["vlan"], "mac": int(v["mac"].replace(":", ""), 16)}


def outsider(kind: int, mode: str, server_public: bytes) -> zmq.Socket:
    s = zmq.Context.instance().socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    if mode == "stranger":
        set_curve_client(s, keys.KeyPair(*zmq.curve_keypair()), server_public)
    return s


# ---------------------------------------------------------------------- without processes


def test_keys_are_made_private_and_read_back(tmp_path):
    kdir = tmp_path / "keys"
    keys.ensure(kdir, [keys.ADMIN, keys.CONTROLLER, "h1"])
    assert stat.S_IMODE(kdir.stat().st_mode) == 0o700
    for name in (keys.ADMIN, keys.CONTROLLER, "h1"):
        assert stat.S_IMODE((kdir / f"{name}.key_secret").stat().st_mode) == 0o600
        assert stat.S_IMODE((kdir / f"{name}.key").stat().st_mode) == 0o644
    ring = keys.KeyRing(kdir)
    pair = keys.load_pair(kdir, "h1")
    assert ring.role(pair.public) == "host:h1" and ring.current["h1"] == pair.public
    assert ring.role(keys.load_pair(kdir, keys.ADMIN).public) == keys.ADMIN
    digest = ring.digest()
    # A key installed for a rotation is accepted beside the current one, not pinned.
    nxt = keys.create(kdir, "h1", "next")
    os.utime(kdir, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    assert ring.maybe_reload() and ring.role(nxt.public) == "host:h1"
    assert ring.current["h1"] == pair.public and ring.digest() != digest
    with pytest.raises(ValueError, match="cannot read the secret key"):
        keys.load_pair(kdir, "h9")


def test_peek_type_reads_only_the_canonical_layout():
    assert auth.peek_type(wire.encode(MsgType.REQUEST, [1, "status", {}])) == int(MsgType.REQUEST)
    assert auth.peek_type(b"\x93\xcc\x01\x10") is None  # a non-canonical version: not peeked
    assert auth.peek_type(b"") is None and auth.peek_type(b"\x92\x01\x10") is None


# ---------------------------------------------------------------------- on a running cluster


@pytest.mark.cluster
@pytest.mark.parametrize("mode", ["stranger", "plain"])
def test_an_outsider_gets_nothing_and_changes_nothing(make_cluster, mode):
    cluster = make_cluster(3)
    cluster.create_vms(3)
    v = vm1(cluster)
    before_tables = tables(cluster, v["mac"], v["vlan"])
    before = counters(cluster)
    ring = keys.KeyRing(cluster.keys_dir)
    h1 = cluster.agents["h1"].info

    # (a) gossip: subscribed to h1's publisher, it never gets a frame.
    sub = outsider(zmq.SUB, mode, ring.current["h1"])
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(h1["pub"])
    # (b) a well-formed claim of vm1's MAC for a bogus host with a high seq, over every way in:
    # the agent's rpc socket, and as a would-be host registering at the controller.
    claim = wire.encode(MsgType.UPDATES, [BOGUS, 1, [[1, v["vlan"], v["mac"], BOGUS, "vEth1", BIG_SEQ, False]]])
    rpc = outsider(zmq.DEALER, mode, ring.current["h1"])
    rpc.connect(h1["rpc"])
    rpc.send(claim)
    # (c) a fault command and a control command to the agent's request socket.
    rpc.send(wire.encode(MsgType.REQUEST, [1, "faults", {"drop": 1.0}]))
    rpc.send(wire.encode(MsgType.REQUEST, [2, "claim", {"vlan": v["vlan"], "mac": v["mac"], "port": "p9",
                                                       "vm": "vm1"}]))
    rpc.send(wire.encode(MsgType.ATTACH, [1, "vm1", v["vlan"], v["mac"], "vEth9", BIG_SEQ]))
    # (d) a move request to the controller.
    ctl = outsider(zmq.DEALER, mode, ring.current["controller"])
    ctl.connect(cluster.controller_endpoint)
    other = next(h for h in cluster.agents if h != v["host"])
    ctl.send(wire.encode(MsgType.REQUEST, [1, "vm_move", {"name": "vm1", "to": other}]))
    ctl.send(wire.encode(MsgType.REGISTER, [BOGUS, 1, "tcp://127.0.0.1:9", "tcp://127.0.0.1:9", 1]))
    try:
        # Every handshake is refused and counted where it was refused...
        def refused():
            now = counters(cluster)
            return (now["h1"]["auth_failures"] >= before["h1"]["auth_failures"] + 2
                    and now["controller"]["auth_failures"] > before["controller"]["auth_failures"])
        wait_for(refused, what="the refusals to be counted")
        # ...and nothing came back: no gossip (h1 heartbeats every 500 ms), no reply.
        assert not sub.poll(1500) and not rpc.poll(0) and not ctl.poll(0)
    finally:
        for s in (sub, rpc, ctl):
            s.close(linger=0)
    assert tables(cluster, v["mac"], v["vlan"]) == before_tables
    assert vm1(cluster)["host"] == v["host"]
    with cluster.agent_client("h1") as a:
        assert not a.call("faults", {}).get("rules"), "an outsider's fault rule took effect"
    with cluster.controller_client() as ctl:
        assert BOGUS not in ctl.call("expected_table")["live_hosts"]
    assert alive(cluster)
    # The refusals are in the event log too (`dvs events --kind auth`).
    from testbed import events as evlog

    evs, _ = evlog.read_all(cluster.state_dir)
    assert {"h1", "controller"} <= {e["proc"] for e in evs if e["kind"] == "auth.failed"}
    with cluster.controller_client(timeout_ms=30_000) as c:
        assert c.call("vm_move", {"name": "vm1", "to": other})["converged"]


@pytest.mark.cluster
def test_a_member_key_outside_its_role_is_forbidden(make_cluster):
    cluster = make_cluster(2)
    cluster.create_vms(2)
    v = vm1(cluster)
    other = next(h for h in cluster.agents if h != v["host"])
    before = counters(cluster)
    # Host h2's key: it may ask h1 for repair, not inject a fault or claim a MAC there.
    with Client(cluster.agents["h1"].info["rpc"], curve=cluster.curve_for("h1", me="h2"), timeout_ms=500) as c:
        for method, args in (("faults", {"drop": 1.0}), ("claim", {"vlan": v["vlan"], "mac": v["mac"],
                                                                   "port": "p9", "vm": "vm1"})):
            with pytest.raises(ClusterError, match="did not answer"):
                c.call(method, args)
    # Nor call the controller's API; and the admin's key may not register a host.
    with Client(cluster.controller_endpoint, curve=cluster.curve_for("controller", me="h2"), timeout_ms=500) as c:
        with pytest.raises(ClusterError, match="did not answer"):
            c.call("vm_move", {"name": "vm1", "to": other})
    with Client(cluster.controller_endpoint, curve=cluster.curve_for("controller"), timeout_ms=2_000) as c:
        c.sock.send(wire.encode(MsgType.REGISTER, [BOGUS, 1, "tcp://127.0.0.1:9", "tcp://127.0.0.1:9", 1]))
        c.call("status")  # (same connection, in order: the REGISTER was handled before this)
    after = counters(cluster)
    assert after["h1"]["forbidden"] == before["h1"]["forbidden"] + 2, after["h1"]
    assert after["h1"]["forbidden_by_role"].get("host:h2") == 2
    assert after["controller"]["forbidden"] == before["controller"]["forbidden"] + 2, after["controller"]
    # ...and told in the event log (`dvs events`), rate-limited per role.
    from testbed import events as evlog

    evs, _ = evlog.read_all(cluster.state_dir)
    told = {(e["proc"], e.get("role")) for e in evs if e["kind"] == "auth.forbidden"}
    assert {("h1", "host:h2"), ("controller", "host:h2"), ("controller", "admin")} <= told, told
    with cluster.agent_client("h1") as a:
        assert not a.call("faults", {}).get("rules")
    assert vm1(cluster)["host"] == v["host"]
    with cluster.controller_client() as ctl:
        assert BOGUS not in ctl.call("expected_table")["live_hosts"]
        assert ctl.call("vm_move", {"name": "vm1", "to": other})["converged"]  # the admin may
    assert alive(cluster)


@pytest.mark.cluster
def test_a_host_whose_key_was_replaced_cannot_rejoin(make_cluster, tmp_path):
    cluster = make_cluster(3)
    procs.stop([cluster.agents["h3"]], 5.0)

    def live():
        with cluster.controller_client() as ctl:
            return ctl.call("expected_table")["live_hosts"]
    wait_for(lambda: "h3" not in live(), 20, "h3 to be declared dead")
    # Someone swaps h3's secret for a key pair the cluster never saw.
    foreign = tmp_path / "foreign"
    keys.create(foreign, "h3")
    kdir = Path(cluster.keys_dir)
    (kdir / "h3.key_secret").write_bytes((foreign / "h3.key_secret").read_bytes())
    def ctl_failures():
        with cluster.controller_client() as ctl:
            return ctl.call("auth")["auth_failures"]

    before = ctl_failures()
    cluster.add_agent("h3")  # (it starts: only its peers can tell its key is not h3's)
    wait_for(lambda: ctl_failures() > before, 10, "the controller to refuse h3's handshake")
    time.sleep(1.0)  # (a few of h3's reconnects and heartbeats: it stays out)
    assert "h3" not in live()
    assert alive(cluster)


class Shuttle:
    """A running 3-host cluster's VM moved back and forth between h1 and h2 while something
    happens (`during`): every move must converge, before, during and after. `retry`: retry a
    move as `dvs vm move` does while a controller restarts (it answers `retry:` or nothing)."""

    def __init__(self, make_cluster, *, retry: bool = False) -> None:
        self.cluster = make_cluster(3)
        self.cluster.create_vms(4)
        with self.cluster.controller_client() as ctl:
            self.placement = {v["vm"]: v["host"] for v in ctl.call("vm_list")["vms"]}
        self.mover = next(vm for vm, h in self.placement.items() if h != "h3")
        self.retry = retry
        self.results: list[bool] = []

    def move(self, to: str) -> bool:
        deadline = time.monotonic() + 30
        while True:
            try:
                with self.cluster.controller_client(timeout_ms=3_000 if self.retry else 30_000) as ctl:
                    return ctl.call("vm_move", {"name": self.mover, "to": to})["converged"]
            except ClusterError as e:
                if not self.retry:
                    raise
                if f"is already on {to}" in str(e):
                    return True  # an attempt the old controller never answered landed (check() says so)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def during(self, action):
        import threading

        first = "h2" if self.placement[self.mover] == "h1" else "h1"
        assert self.move(first)  # before
        stop = threading.Event()

        def shuttle():
            to = "h1" if first == "h2" else "h2"  # (where the move above did not put it)
            while not stop.is_set():
                self.results.append(self.move(to))
                to = "h2" if to == "h1" else "h1"

        t = threading.Thread(target=shuttle)
        t.start()
        try:
            return action()
        finally:
            stop.set()
            t.join(60)
            assert self.results and all(self.results), self.results  # during

    def after(self) -> None:
        from testbed.check import check

        assert check(self.cluster)["ok"]
        assert self.move("h3")  # after: onto the host that did not shuttle
        assert check(self.cluster, settle_s=0)["ok"]
        assert alive(self.cluster)


@pytest.mark.cluster
def test_rotation_keeps_the_cluster_checking_ok_and_moves_converging(make_cluster):
    from testbed import rotate

    sh = Shuttle(make_cluster)
    cluster = sh.cluster
    old = keys.KeyRing(cluster.keys_dir).current
    done = sh.during(lambda: [rotate.rotate(cluster, "h3"), rotate.rotate(cluster, keys.ADMIN)])
    new = keys.KeyRing(cluster.keys_dir).current
    assert new["h3"] != old["h3"] and new[keys.ADMIN] != old[keys.ADMIN] and new["h1"] == old["h1"]
    assert [d["new"] for d in done] == [keys.fingerprint(new["h3"]), keys.fingerprint(new[keys.ADMIN])]
    assert not any(k.stage for k in keys.scan(Path(cluster.keys_dir)))  # the old keys are gone
    sh.after()  # (h3: the host whose key changed)


@pytest.mark.cluster
def test_rotating_the_controllers_key_restarts_it_and_every_agent_follows(make_cluster):
    from testbed import rotate

    sh = Shuttle(make_cluster, retry=True)
    cluster = sh.cluster
    old_pid = cluster.controller.pid
    old = keys.KeyRing(cluster.keys_dir).current
    done = sh.during(lambda: rotate.rotate(cluster, keys.CONTROLLER))
    new = keys.KeyRing(cluster.keys_dir).current
    assert new[keys.CONTROLLER] != old[keys.CONTROLLER] and new["h1"] == old["h1"]
    assert done["new"] == keys.fingerprint(new[keys.CONTROLLER])
    assert not any(k.stage for k in keys.scan(Path(cluster.keys_dir)))  # the old pair is gone
    assert cluster.controller.pid != old_pid  # it restarted on the new key ...
    for h in cluster.agents:  # ... and the agents, not restarted, renewed their control connections
        with cluster.agent_client(h) as a:
            assert a.call("status")["incarnation"] == cluster.agents[h].info["incarnation"]
    sh.after()


@pytest.mark.cluster
def test_a_member_cannot_take_over_another_hosts_control_connection(make_cluster):
    """What another host can know of h2's control connection (its name and incarnation, which
    PEERS carries) is not its routing id: connecting under that name kicks nothing (the
    controller's ROUTER hands a routing id over to the last to connect with it)."""
    cluster = make_cluster(2)
    cluster.create_vms(2)
    inc = cluster.agents["h2"].info["incarnation"]
    before = counters(cluster)["controller"]["forbidden"]
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.setsockopt(zmq.ROUTING_ID, f"agent:h2:{inc}".encode())
        set_curve_client(sock, *cluster.curve_for("controller", me="h1"))  # h1's key, h2's name
        sock.connect(cluster.controller_endpoint)
        for _ in range(5):
            sock.send(wire.encode(MsgType.AGENT_STATUS, ["h1", 1, 1, 0, "0", 0, 0]))
        wait_for(lambda: counters(cluster)["controller"]["forbidden"] > before, 10,
                 "the controller to refuse a connection named after h2 with h1's key")
        # h2's own control connection still works: a move to it converges, h2 stays alive.
        v = vm1(cluster)
        dst = "h2" if v["host"] != "h2" else "h1"
        with cluster.controller_client() as ctl:
            assert ctl.call("vm_move", {"name": "vm1", "to": dst})["converged"]
            assert {h["host"]: h["state"] for h in ctl.call("status")["hosts"]}["h2"] == "alive"
    finally:
        sock.close(linger=0)
    assert alive(cluster)
