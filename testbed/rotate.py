"""`dvs keys rotate`: replace a key pair with no downtime, in Serf's three steps.

1. install: a new pair `NAME.next` beside the current one; wait until every process accepts it
   (each re-reads the key directory within a second: dvswitch/keys.py, and reports which keys it
   accepts as `keyring_digest`);
2. use: the new pair becomes `NAME` (the old one `NAME.old`, still accepted) and its owner
   switches: a host's agent is restarted on it (its peers then pin the new key when they
   reconnect to the new incarnation), `dvs` itself simply speaks with the new admin key, and
   the controller is restarted on it (from its journal, as after `dvs fault kill controller`),
   while every agent, seeing the controller's key change in the directory, renews its control
   connection pinned to the new key and registers again;
3. remove: the old pair is deleted; wait until no process accepts it any more.
Connections authenticate once, in the handshake, so the ones already up are never cut by steps
1 and 3; only the owner's restart in step 2 reconnects (as any agent restart does).

The controller's switch is the one step the cluster notices: for about as long as a controller
restart takes (1-2 s here), the API answers `retry:` or nothing and apply reports wait; the data
plane, gossip and headless moves go on throughout.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from dvswitch import keys
from testbed import procs
from testbed.client import ClusterError
from testbed.cluster import Cluster

WAIT_S = 15.0  # per step: how long every process may take to re-read the key directory


def keyrings_agree(cluster: Cluster) -> tuple[str, list[str]]:
    """(the directory's digest, the processes whose key ring differs or that did not answer)."""
    want = keys.KeyRing(cluster.keys_dir).digest()
    behind = []
    targets: list[tuple[str, Callable]] = [("controller", cluster.controller_client)]
    targets += [(h, lambda h=h: cluster.agent_client(h, timeout_ms=1_000)) for h, p in cluster.agents.items()
                if procs.alive(p)]
    for name, make in targets:
        try:
            with make() as c:
                if c.call("auth")["keyring_digest"] != want:
                    behind.append(name)
        except (ClusterError, KeyError):
            behind.append(name)
    return want, behind


def wait_keyrings(cluster: Cluster, step: str, wait_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        _, behind = keyrings_agree(cluster)
        if not behind:
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"key rotation, {step}: {', '.join(behind)} did not take the new key set within "
                               f"{wait_s:g} s; the keys are as that step left them (see `dvs keys show`)")
        time.sleep(0.1)


def _switch(kdir: Path, name: str) -> None:
    """NAME -> NAME.old and NAME.next -> NAME, with a NAME file there at every instant (a hard
    link keeps the old one as NAME.old, then an atomic rename puts the new one in its place)."""
    for ext in (".key", ".key_secret"):
        cur, old, nxt = (kdir / f"{n}{ext}" for n in (name, f"{name}.old", f"{name}.next"))
        keys.remove(old)
        os.link(cur, old)
        os.replace(nxt, cur)


def rotate(cluster: Cluster, name: str, *, log: Callable[[str], None] = lambda s: None,
           ready_timeout_s: float = 30.0) -> dict:
    """Rotate `name`'s key pair (a host id, "admin" or "controller"). Returns the old and new
    fingerprints."""
    if cluster.keys_dir is None:
        raise ClusterError("this cluster runs without CURVE (`dvs up --insecure`): it has no keys to rotate")
    if name == keys.CONTROLLER:
        if cluster.controller is None or not procs.alive(cluster.controller):
            raise ClusterError("the controller is not running; start it (`dvs controller start`) before rotating "
                               "its key")
    elif name != keys.ADMIN:
        cluster.agent(name)  # (an unknown host: one-line error)
    kdir = Path(cluster.keys_dir)
    if not (kdir / f"{name}.key_secret").exists():
        raise ClusterError(f"no key pair for {name} in {kdir}")
    for stage in keys.STAGES:
        keys.remove(kdir / f"{name}.{stage}.key")  # (what a rotation cut short left behind)
        keys.remove(kdir / f"{name}.{stage}.key_secret")
    old = keys.load_pair(kdir, name)
    new = keys.create(kdir, name, "next")
    log(f"{name}: installed {keys.fingerprint(new.public)} beside {keys.fingerprint(old.public)}")
    wait_keyrings(cluster, "install")
    _switch(kdir, name)
    if name == keys.CONTROLLER:
        procs.stop([cluster.controller])
        cluster.start_controller(ready_timeout_s=ready_timeout_s)
        _wait_member(cluster, {h for h, p in cluster.agents.items() if procs.alive(p)}, ready_timeout_s,
                     "register with the controller on its new key")
    elif name != keys.ADMIN:
        proc = cluster.agent(name)
        if procs.alive(proc):
            procs.stop([proc])
            cluster.add_agent(name, ready_timeout_s=ready_timeout_s)
            _wait_member(cluster, {name}, ready_timeout_s, "rejoin on its new key")
    log(f"{name}: now uses {keys.fingerprint(new.public)}")
    wait_keyrings(cluster, "use")
    keys.remove(kdir / f"{name}.old.key")
    keys.remove(kdir / f"{name}.old.key_secret")
    wait_keyrings(cluster, "remove")
    log(f"{name}: removed {keys.fingerprint(old.public)}")
    return {"name": name, "old": keys.fingerprint(old.public), "new": keys.fingerprint(new.public)}


def _wait_member(cluster: Cluster, hosts: set[str], timeout_s: float, why: str) -> None:
    """Until the controller counts each of `hosts` alive (again) and every live agent hears
    every other; the controller may itself be starting (it answers nothing for a moment)."""
    deadline = time.monotonic() + timeout_s
    alive: set[str] = set()
    while time.monotonic() < deadline:
        try:
            with cluster.controller_client() as ctl:
                st = {h["host"]: h for h in ctl.call("status")["hosts"]}
        except ClusterError:
            st = {}
        alive = {h for h, v in st.items() if v["state"] == "alive"}
        if hosts <= alive and all(st[h]["peers_heard"] >= len(st) - 1 for h in alive):
            return
        time.sleep(0.1)
    raise ClusterError(f"key rotation: {', '.join(sorted(hosts - alive)) or 'the mesh'} did not {why} within "
                       f"{timeout_s:g} s")


def show(cluster_keys_dir: str) -> list[dict]:
    return [{"name": k.name, "role": k.role, "stage": k.stage or "in use", "fingerprint": k.fingerprint,
             "file": str(k.path)} for k in keys.scan(Path(cluster_keys_dir))]
