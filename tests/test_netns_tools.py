"""Pure parts of netns mode: the tools' output parsers (on recorded output), VM addresses, the
explicit VTEP map, and the TAP frame rules. No root needed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent import tap, vxlan
from agent.dpruntime import VtepMap
from testbed import tooltraffic as tt
from testbed.vmns import vm_address, vm_subnet

DATA = Path(__file__).parent / "data"


def test_ping_parser_on_recorded_loss():
    # Recorded: ping -D -O -n -i 0.01 -c 40 while the peer VM's link was down for ~100 ms.
    log = tt.parse_ping((DATA / "ping_loss.txt").read_text())
    assert (log.transmitted, log.received) == (40, 34)
    assert len(log.replies) == 34 and log.duplicates == 0
    assert sorted(log.no_answer) == [14, 15, 16, 17, 18, 19]
    assert log.replies[13] == (1796307685.911902, 0.621)
    sends = tt.ping_send_times(log, 0.01)
    assert sorted(sends) == list(range(1, 41))
    assert sends[13] == pytest.approx(1796307685.911902 - 0.000621)
    assert sends[14] == pytest.approx(sends[13] + 0.01)  # interpolated from the last answered one
    whole = tt.ping_window_stats(log, sends, float("-inf"), float("inf"))
    assert whole["lost"] == 6 and whole["pings"] == 40
    assert whole["gap_ms_max"] == pytest.approx(1796307686.057265e3 - 1796307685.911902e3, abs=1e-3)
    # A window that ends before the outage sees neither the loss nor the gap.
    before = tt.ping_window_stats(log, sends, float("-inf"), sends[12])
    assert before["lost"] == 0 and before["gap_ms_max"] < 40
    assert before["send_gap_ms_max"] <= before["gap_ms_max"] + 5


def test_ping_parser_duplicates_and_garbage():
    text = ("PING 198.18.64.2 (198.18.64.2) 56(84) bytes of data.\n"
            "[100.000100] 64 bytes from 198.18.64.2: icmp_seq=1 ttl=64 time=0.100 ms\n"
            "[100.000200] 64 bytes from 198.18.64.2: icmp_seq=1 ttl=64 time=0.200 ms (DUP!)\n"
            "From 198.18.64.1 icmp_seq=2 Destination Host Unreachable\n"
            "not ping at all\n"
            "2 packets transmitted, 1 received, +1 duplicates, 50% packet loss, time 10ms\n")
    log = tt.parse_ping(text)
    assert log.duplicates == 1 and list(log.replies) == [1] and (log.transmitted, log.received) == (2, 1)
    assert tt.ping_window_stats(log, tt.ping_send_times(log, 0.01), 0, 1000)["lost"] == 1
    empty = tt.parse_ping("")
    assert empty.transmitted is None and tt.ping_window_stats(empty, {}, 0, 1)["gap_ms_max"] is None


def test_iperf3_parser_on_recorded_output():
    # Recorded: iperf3 -c ... -t 1 -i 0.1 -J -b 50M between two VMs on different hosts.
    log = tt.parse_iperf3((DATA / "iperf3_client.json").read_text())
    assert log.ok and log.error is None and log.seconds == pytest.approx(1.0, abs=0.01)
    assert len(log.intervals) == 10 and log.retransmits == 0
    assert log.bits_per_second == pytest.approx(50.3e6, rel=0.01)
    st = tt.iperf_window_stats(log, 1000.0, 1000.41, 1000.45)  # only the 5th interval (41.9 Mbit/s)
    assert st["mbps_min"] == pytest.approx(41.9, abs=0.1) and st["mbps_median"] == pytest.approx(52.4, abs=0.1)
    assert 15 < st["dip_pct"] < 25 and st["mbps_window"] == pytest.approx(41.9, abs=0.1)
    whole = tt.iperf_window_stats(log, 1000.0, 1000.0, 1001.0)  # every interval: the mean is near the median
    assert whole["mbps_min"] == pytest.approx(41.9, abs=0.1) and whole["dip_pct"] < 5
    refused = tt.parse_iperf3((DATA / "iperf3_refused.json").read_text())
    assert not refused.ok and "Connection refused" in refused.error and refused.intervals == []
    assert not tt.parse_iperf3("").ok and not tt.parse_iperf3("{broken").ok


def test_move_windows_are_cut_at_the_same_pairs_neighbouring_switchovers():
    runs = [tt.Pair({"vm": "vm1"}, {"vm": "vm2"}, "x"), tt.Pair({"vm": "vm3"}, {"vm": "vm4"}, "y")]
    s = 1_000_000_000
    recs = [{"vm": "vm1", "switch_ns": 10 * s}, {"vm": "vm3", "switch_ns": 10 * s + s // 10},
            {"vm": "vm2", "switch_ns": 10 * s + s // 5}, {"vm": "vm9", "switch_ns": 11 * s}, {"vm": "vm1"}]
    w = tt._windows(recs, runs, 0)
    assert w[0] == (0, pytest.approx(9.5), pytest.approx(10.2))  # cut at vm2's switchover (same pair)
    assert w[1] == (1, pytest.approx(9.6), pytest.approx(11.1))  # the other pair's moves do not cut it
    assert w[2] == (0, pytest.approx(10.0), pytest.approx(11.2))
    assert w[3] is None and w[4] is None  # not a paired VM; no switchover stamp


def test_vm_addresses_are_in_the_benchmarking_block_one_subnet_per_vlan():
    assert vm_address(100, "02:00:00:00:00:01") == "198.18.64.1"
    assert vm_address(100, 0x02_00_00_00_00_10) == "198.18.64.16"
    assert str(vm_subnet(110)) == "198.18.224.0/20" and str(vm_subnet(130)) == "198.18.32.0/20"
    assert {str(vm_subnet(v)) for v in (100, 110, 120, 130)} == {"198.18.64.0/20", "198.18.224.0/20",
                                                                 "198.19.128.0/20", "198.18.32.0/20"}
    assert vm_address(4094, 0x02_00_00_00_0F_FE).startswith("198.19.")
    assert vm_address(100, 0x02_00_00_00_0F_FF) is None and vm_address(100, 0x02_00_00_00_00_00) is None


def test_vtep_map_is_explicit_and_checked(tmp_path):
    assert vxlan.parse_vtep_map({"h1": "10.1.0.2", "db-7": "192.0.2.9"}) == {"h1": "10.1.0.2", "db-7": "192.0.2.9"}
    for bad, what in (([], "JSON object"), ({"h1": "10.1.0.300"}, "not an IPv4"), ({"h1": 5}, "not an IPv4"),
                      ({"h1": "10.0.0.2", "h2": "10.0.0.2"}, "same VTEP"), ({"": "10.0.0.2"}, "bad host")):
        with pytest.raises(ValueError, match=what):
            vxlan.parse_vtep_map(bad)
    path = tmp_path / "vteps.json"
    path.write_text(json.dumps({"h1": "10.9.0.3"}))
    m = VtepMap(str(path))
    assert m.ip_of("h1") == "10.9.0.3" and m.host_of("10.9.0.3") == "h1" and m.host_of("10.9.0.4") is None
    # A host added later: the file changes and an unknown name re-reads it (at most once a second).
    path.write_text(json.dumps({"h1": "10.9.0.3", "h2": "10.9.0.4"}))
    os.utime(path, ns=(m._mtime_ns + 1_000_000_000, m._mtime_ns + 1_000_000_000))
    m._checked = 0.0
    assert m.ip_of("h2") == "10.9.0.4" and m.host_of("10.9.0.4") == "h2"
    path.write_text("{nope")
    with pytest.raises(ValueError, match="not JSON"):
        VtepMap(str(path))
    with pytest.raises(ValueError, match="cannot read"):
        VtepMap(str(tmp_path / "missing.json"))


def test_tap_queue_tags_what_the_vm_sends_and_untags_what_it_gets():
    # A pipe stands in for the TAP fd: the frame rules are the same bytes either way.
    r, w = os.pipe()
    os.set_blocking(r, False)
    q = tap.TapQueue(r, "vm1", 100, 0x020000000001, True)
    untagged = vxlan.mac_bytes(0x020000000002) + vxlan.mac_bytes(0x020000000001) + b"\x08\x00" + bytes(46)
    os.write(w, untagged)
    [frame] = q.read_frames(8)
    assert vxlan.parse_tagged(frame)[2:] == (100, 0x0800) and frame[:12] == untagged[:12]
    os.write(w, untagged[:12] + b"\x81\x00\x00\x64" + untagged[12:])  # the VM tagging its own frame
    assert q.read_frames(8) == [] and q.dropped == 1
    q.close()
    os.close(w)
    r2, w2 = os.pipe()
    out = tap.TapQueue(w2, "vm1", 100, 0x020000000001, True)
    out.write(frame)
    assert os.read(r2, 100) == untagged and out.tx_frames == 1
    out.close()
    os.close(r2)


def test_baseline_windows_avoid_the_pairs_switchovers():
    sends = {i: 100.0 + i * 0.01 for i in range(1, 1001)}  # 10 s of pings
    assert len(tt.baseline_windows(sends, [], 1.5)) == 6
    ws = tt.baseline_windows(sends, [105.0], 1.5)
    assert ws and all(not (lo - 1.5 <= 105.0 <= hi + 1.5) for lo, hi in ws)
    assert tt.baseline_windows({}, [], 1.5) == []
