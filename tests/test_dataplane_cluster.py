"""The data plane with real agent processes: frames travel agent to agent as VXLAN datagrams
on the hosts' VTEPs (127.a.b.N:4789), VMs are UDP sockets in the test (their vNIC backends)."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import time

import pytest

from agent import vxlan
from agent.mactable import format_mac, parse_mac
from testbed import nemesis, traffic
from tests.conftest import run_dvs
from tests.test_cli import assert_one_line_error

pytestmark = pytest.mark.cluster


class Vm:
    """A VM's vNIC backend: a UDP socket the agents deliver its frames to."""

    def __init__(self, name: str, mac: int, vlan: int) -> None:
        self.name, self.mac, self.vlan = name, mac, vlan
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.egress = None
        self.got: list[bytes] = []

    def binding(self) -> list:
        return [self.mac, "127.0.0.1", self.sock.getsockname()[1]]

    def poll(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65536)
            except BlockingIOError:
                return
            if vxlan.parse_link_notice(data) is not None:
                self.egress = addr
            else:
                self.got.append(data)

    def send(self, dst: int, vlan: int | None = None, payload: bytes = b"test") -> bytes:
        f = vxlan.build_tagged(dst, self.mac, vlan or self.vlan, vxlan.ETHERTYPE_TEST, payload)
        self.sock.sendto(f, self.egress)
        return f


def plug(cluster, vms: list[Vm]) -> None:
    for h in cluster.agents:
        with cluster.agent_client(h) as a:
            a.call("vnic_plug", {"vnics": [v.binding() for v in vms]})
    wait_for(lambda: all(v.egress for v in vms), vms)


def wait_for(cond, vms, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for v in vms:
            v.poll()
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError("timed out")


def settle(vms, quiet_s: float = 0.3) -> None:
    """Collect what arrives until nothing has for `quiet_s` (absence checks only)."""
    time.sleep(quiet_s)
    for v in vms:
        v.poll()


def dp_counters(cluster, host: str) -> dict:
    with cluster.agent_client(host) as a:
        return a.call("dataplane")


def test_flooding_and_vlan_isolation_across_hosts(make_cluster):
    cluster = make_cluster(3)
    specs = [["a1", "h1", "default"], ["a2", "h2", "default"], ["a3", "h3", "default"],
             ["w1", "h1", "web"], ["w3", "h3", "web"]]
    with cluster.controller_client(timeout_ms=30_000) as ctl:
        ctl.call("vm_create", {"vms": specs})
        inv = {v["vm"]: v for v in ctl.call("vm_list")["vms"]}
    vms = {n: Vm(n, parse_mac(inv[n]["mac"]), inv[n]["vlan"]) for n in inv}
    a1, a2, a3, w1, w3 = (vms[n] for n in ("a1", "a2", "a3", "w1", "w3"))
    assert a1.vlan != w1.vlan
    try:
        plug(cluster, list(vms.values()))
        before = dp_counters(cluster, "h1")["counters"]["vxlan_tx"]

        # Broadcast in VLAN 100 from h1: one VXLAN copy to each host with a VLAN-100 port
        # (head-end replication), delivered to every other VLAN-100 VM and no VLAN-110 VM.
        bcast = a1.send(vxlan.BROADCAST)
        wait_for(lambda: a2.got and a3.got, vms.values())
        settle(vms.values())
        assert a2.got == [bcast] and a3.got == [bcast]
        assert not a1.got and not w1.got and not w3.got
        assert dp_counters(cluster, "h1")["counters"]["vxlan_tx"] - before == 2

        # Unknown unicast is flooded the same way, within the VLAN only; w3's MAC is not in
        # VLAN 100, so a VLAN-100 frame to it is unknown there and never reaches w3.
        for v in vms.values():
            v.got.clear()
        unknown = a1.send(0x02_00_00_AB_CD_EF)
        to_w3 = a1.send(w3.mac)
        wait_for(lambda: len(a2.got) == 2 and len(a3.got) == 2, vms.values())
        settle(vms.values())
        assert a2.got == [unknown, to_w3] == a3.got
        assert not w1.got and not w3.got

        # Known unicast in VLAN 110 goes to its VM only, through VNI 10110.
        for v in vms.values():
            v.got.clear()
        f = w1.send(w3.mac)
        wait_for(lambda: w3.got, vms.values())
        settle(vms.values())
        assert w3.got == [f] and not (a1.got or a2.got or a3.got)

        # A VM cannot put a frame into a VLAN its port is not in.
        drops = dp_counters(cluster, "h1")["drops"]["unknown_source"]
        a1.send(w3.mac, vlan=w1.vlan)
        settle(vms.values())
        assert not w3.got[1:]
        st = dp_counters(cluster, "h1")
        assert st["drops"]["unknown_source"] == drops + 1
        ports = {p["vm"]: p for p in st["ports"]}
        assert ports["a1"]["rx_frames"] == 3 and ports["w1"]["rx_frames"] == 1
    finally:
        for v in vms.values():
            v.sock.close()


def test_traffic_with_moves_accounts_for_every_frame(make_cluster, tmp_path):
    cluster = make_cluster(4)
    cluster.create_vms(8)
    sd = str(cluster.state_dir)
    # Bad input: one line, non-zero exit.
    assert_one_line_error(run_dvs("traffic", "--pairs", "5", "--duration", "1", state_dir=sd), "needs 10 VMs")
    assert_one_line_error(run_dvs("traffic", "--pairs", "0", state_dir=sd), "--pairs")
    assert_one_line_error(run_dvs("traffic", "--pairs", "1", "--rate", "fast", state_dir=sd), "--rate")

    proc = run_dvs("traffic", "--pairs", "4", "--rate", "100", "--duration", "3", "--moves", "3", "--json",
                   state_dir=sd)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    f = rep["frames"]
    assert rep["accounted"] and f["sent"] == f["delivered"] + f["lost"]
    assert f["sent"] == 4 * 100 * 3 and f["not_sent"] == 0
    # Fault-free: nothing lost, duplicated or misdelivered, even across the moves.
    assert (f["lost"], f["duplicated"], f["misdelivered"]) == (0, 0, 0), rep["agents"]
    assert len(rep["moves"]) == 3
    for m in rep["moves"]:
        assert m["converged"] and m["frames"] > 0 and m["lost"] == 0 and m["misdelivered"] == 0
        assert m["blackout_ms"] is not None  # frames reached the moved VM at its new host
    assert rep["agents"]["rarp_sent"] >= 3 and rep["agents"]["departures"] >= 3

    # Per-port counters show in `dvs status --json` and `dvs mac-table --json`.
    st = json.loads(run_dvs("status", "--json", state_dir=sd).stdout)
    ports = [p for h in st["hosts"] for p in h["dataplane"]["ports"]]
    assert sum(p["rx_frames"] for p in ports) > 0 and {"rx_frames", "tx_frames", "drop_frames"} <= set(ports[0])
    mt = json.loads(run_dvs("mac-table", "h1", "--json", state_dir=sd).stdout)
    local = [e for e in mt["entries"] if e["local"]]
    assert local and sum(e["rx_frames"] + e["tx_frames"] for e in local) > 0


def _tshark_can_capture() -> str | None:
    """None if tshark may capture on lo here, else why not. Listing interfaces (`tshark -D`)
    works for anyone; only a real capture shows whether this user may capture, so try one
    packet (a datagram we send to ourselves) with a short deadline."""
    if shutil.which("tshark") is None:
        return "tshark is not installed (Debian: apt-get install tshark)"
    import socket
    import tempfile

    with tempfile.TemporaryDirectory() as d, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        probe = subprocess.Popen(["tshark", "-i", "lo", "-c", "1", "-a", "duration:5", "-f", f"udp port {port}",
                                  "-w", os.path.join(d, "probe.pcapng")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 20
            while probe.poll() is None and time.monotonic() < deadline:
                s.sendto(b"probe", ("127.0.0.1", port))
                time.sleep(0.2)
        finally:
            if probe.poll() is None:
                probe.kill()
            err = probe.communicate()[1]
    if probe.returncode != 0:
        lines = [ln for ln in err.splitlines() if ln.strip() and "Capturing on" not in ln]
        why = next((ln for ln in lines if "ermission" in ln or "not permitted" in ln), lines[-1] if lines else "")
        return f"tshark may not capture on lo as this user: {why.strip() or f'exit {probe.returncode}'}"
    return None


def test_tshark_decodes_the_traffic_as_vxlan(make_cluster, tmp_path):
    reason = _tshark_can_capture()
    if reason:
        pytest.skip(reason)
    # The RARP of a move crosses the overlay only as a flood-and-learn switch floods it.
    cluster = make_cluster(3, agent_args=["--rarp-to-overlay"])
    cluster.create_vms(3)  # vm1 on h1, vm2 on h2, vm3 on h3 (the mover's destination)
    base = cluster.vtep_base
    vteps = {vxlan.vtep_ip(base, h) for h in cluster.agents}
    pcap = tmp_path / "lo.pcapng"
    # The default VXLAN port, so tshark decodes it with no decode-as options; only our block.
    cap = subprocess.Popen(["tshark", "-i", "lo", "-f", f"udp dst port 4789 and net {base}/24", "-w", str(pcap)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        started = ""
        while "Capturing on" not in started:
            left = deadline - time.monotonic()
            if left <= 0 or cap.poll() is not None:
                pytest.skip(f"tshark did not start capturing: {started.strip() or cap.stderr.read()}")
            if select.select([cap.stderr], [], [], left)[0]:
                started += cap.stderr.readline()
        time.sleep(0.3)  # dumpcap's filter is attached once it says so; a margin costs nothing
        run = traffic.TrafficRun(cluster, 1, 40)
        run.setup()
        run.start()
        time.sleep(0.5)
        with cluster.controller_client(timeout_ms=30_000) as ctl:
            move = ctl.call("vm_move", {"name": "vm1", "to": "h3"})
        assert move["converged"]
        time.sleep(0.5)
        run.finish()
        rep = run.report([move])
        time.sleep(0.5)
    finally:
        cap.send_signal(signal.SIGINT)
        try:
            cap.wait(timeout=30)
        except subprocess.TimeoutExpired:
            cap.kill()
            cap.wait()
    assert rep["frames"]["lost"] == 0, rep
    out = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-E", "separator=,", "-E", "occurrence=l",
                          "-e", "ip.src", "-e", "ip.dst", "-e", "vxlan.vni", "-e", "eth.src", "-e", "eth.dst",
                          "-e", "eth.type"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [ln.split(",") for ln in out.stdout.strip().splitlines()]
    assert rows, "nothing captured"
    m1, m2 = (format_mac(parse_mac(f"02:00:00:00:00:0{i}")) for i in (1, 2))
    test_frames = rarps = 0
    for src_ip, dst_ip, vni, eth_src, eth_dst, eth_type in rows:
        assert src_ip in vteps and dst_ip in vteps and src_ip != dst_ip
        assert vni == "10100", rows[:3]  # VLAN 100 (profile default) → VNI 10000 + 100
        if eth_type == "0x88b5":
            assert (eth_src, eth_dst) in ((m1, m2), (m2, m1))
            test_frames += 1
        elif eth_type == "0x8035":
            assert (eth_src, eth_dst) == (m1, "ff:ff:ff:ff:ff:ff")  # the RARP for vm1 from h3
            assert src_ip == vxlan.vtep_ip(base, "h3")
            rarps += 1
    assert test_frames >= rep["frames"]["delivered"] - rep["agents"].get("local", 0) > 0
    assert rarps >= 1


def test_a_partition_cuts_the_data_plane_too(make_cluster):
    cluster = make_cluster(2)
    cluster.create_vms(2)  # vm1 on h1, vm2 on h2: one pair across the cut
    nemesis.partition(cluster, nemesis.groups_to_blocked(list(cluster.agents), [["h1"], ["h2"]]))
    cut = traffic.TrafficRun(cluster, 1, 100)
    cut.setup()
    cut.start()
    time.sleep(0.5)
    cut.finish(drain_s=0.5)
    rep = cut.report()
    assert rep["accounted"] and rep["frames"]["sent"] > 0 and rep["frames"]["delivered"] == 0
    nemesis.heal(cluster)
    healed = traffic.TrafficRun(cluster, 1, 100)
    healed.setup()
    healed.start()
    time.sleep(0.5)
    healed.finish()
    f = healed.report()["frames"]
    assert f["sent"] > 0 and f["delivered"] == f["sent"]
