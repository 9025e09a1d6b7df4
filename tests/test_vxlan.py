"""The Ethernet / 802.1Q / VXLAN codec and the data plane's addressing, fed raw bytes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import vxlan
from agent.vxlan import FrameError

A, B = 0x02_00_00_00_00_01, 0x02_00_00_00_00_02


def test_tagged_frame_round_trip():
    f = vxlan.build_tagged(B, A, 100, vxlan.ETHERTYPE_TEST, b"hello")
    assert len(f) == 18 + 46  # padded to the Ethernet minimum
    assert f[12:16] == b"\x81\x00\x00\x64"
    assert vxlan.parse_tagged(f) == (B, A, 100, vxlan.ETHERTYPE_TEST)


def test_encap_is_rfc7348_with_the_tag_stripped():
    f = vxlan.build_tagged(B, A, 100, 0x0800, b"x" * 50)
    d = vxlan.encap(f, vxlan.vni_of(100, 10_000))
    # 8-byte header: flags with I set, 24 reserved bits, VNI, 8 reserved bits.
    assert d[:8] == bytes([0x08, 0, 0, 0]) + (10_100).to_bytes(3, "big") + b"\x00"
    inner = d[8:]
    assert inner[:12] == f[:12] and inner[12:14] == b"\x08\x00"  # no 802.1Q tag inside
    vni, got = vxlan.decap(d)
    assert vni == 10_100 and got == inner
    assert vxlan.retag(got, 100) == f


def test_vni_mapping():
    assert vxlan.vni_of(100, 10_000) == 10_100
    assert vxlan.vlan_of(10_100, 10_000) == 100
    assert vxlan.vlan_of(10_000, 10_000) is None  # VLAN 0 is not a VLAN
    assert vxlan.vlan_of(10_000 + 4095, 10_000) is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x08" + bytes(20),  # too short for header + Ethernet
        bytes(8) + bytes(14),  # I flag clear
        b"\x08\x00\x00\x00\x00\x27\x74\x00" + bytes(12) + b"\x81\x00" + bytes(10),  # inner 802.1Q tag
        b"\x08\x00\x00\x00\x00\x27\x74\x00" + bytes(6) + b"\x01" + bytes(5) + b"\x08\x00",  # group source
        b"\x08" + bytes(7) + bytes(vxlan.MAX_FRAME_BYTES + 1),
    ],
)
def test_decap_rejects_malformed(data):
    with pytest.raises(FrameError):
        vxlan.decap(data)


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        bytes(17),
        vxlan.mac_bytes(B) + vxlan.mac_bytes(A) + b"\x08\x00" + bytes(46),  # untagged
        vxlan.mac_bytes(B) + vxlan.mac_bytes(A) + b"\x81\x00\x00\x00\x08\x00",  # VLAN 0
        vxlan.mac_bytes(B) + vxlan.mac_bytes(A) + b"\x81\x00\x0f\xff\x08\x00",  # VLAN 4095
        vxlan.mac_bytes(B) + vxlan.mac_bytes(A | 1 << 40) + b"\x81\x00\x00\x64\x08\x00",  # group source
        vxlan.mac_bytes(B) + vxlan.mac_bytes(A) + b"\x81\x00\x00\x64\x08\x00" + bytes(vxlan.MAX_FRAME_BYTES),
    ],
)
def test_parse_tagged_rejects_malformed(frame):
    with pytest.raises(FrameError):
        vxlan.parse_tagged(frame)


@given(st.binary(max_size=200))
def test_garbage_only_ever_raises_frame_error(data):
    for fn in (vxlan.decap, vxlan.parse_tagged):
        try:
            fn(data)
        except FrameError:
            pass
    vxlan.parse_link_notice(data)


def test_rarp_is_a_broadcast_reverse_request_for_the_vm():
    f = vxlan.rarp(A, 110)
    dst, src, vlan, etype = vxlan.parse_tagged(f)
    assert (dst, src, vlan, etype) == (vxlan.BROADCAST, A, 110, vxlan.ETHERTYPE_RARP)
    htype, ptype, hlen, plen, op = struct.unpack_from("!HHBBH", f, 18)
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 3)
    assert f[26:32] == vxlan.mac_bytes(A) and f[36:42] == vxlan.mac_bytes(A)


def test_link_notice_round_trip():
    f = vxlan.link_notice(A, vxlan.switch_mac("h3"), 100, "h3", 123456789)
    assert vxlan.parse_tagged(f)[:3] == (A, vxlan.switch_mac("h3"), 100)
    assert vxlan.parse_link_notice(f) == ("h3", 123456789)
    assert vxlan.parse_link_notice(vxlan.rarp(A, 100)) is None


def test_vtep_addressing():
    assert vxlan.vtep_ip("127.0.0.1", "h1") == "127.0.0.2"
    assert vxlan.vtep_ip("127.0.0.1", "h8") == "127.0.0.9"
    assert vxlan.vtep_ip("127.9.3.0", "h256") == "127.9.4.0"
    assert vxlan.vtep_ip("127.0.0.1", "web") is None
    assert vxlan.vtep_ip("not-an-ip", "h1") is None
    assert vxlan.host_of_vtep("127.0.0.1", "127.0.0.9") == "h8"
    assert vxlan.host_of_vtep("127.0.0.1", "127.0.0.1") is None
    assert vxlan.host_of_vtep("127.0.0.1", "10.0.0.1") is None
