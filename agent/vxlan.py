"""Ethernet / 802.1Q / VXLAN (RFC 7348) encoding and the data plane's addressing. No I/O.

Frames between a VM and its switch port are 802.1Q-tagged Ethernet II frames (no FCS):

    dst MAC (6) | src MAC (6) | 0x8100 | PCP/DEI/VID (2) | ethertype (2) | payload

Between hosts a frame travels inside VXLAN over UDP (RFC 7348 §5): an 8-byte header with the
I flag set and the 24-bit VNI, then the inner frame *without* its 802.1Q tag (the VNI stands
for the VLAN; §6.1: a decapsulated frame that still carries an inner tag is discarded).

Addressing, all derived from a host's name so no extra message is needed:
- host `hN`'s VTEP is IPv4 `vtep_base + N` on UDP port 4789 (IANA's VXLAN port, so tshark
  decodes it with no options). Default base 127.0.0.1: h1 = 127.0.0.2, h2 = 127.0.0.3, ...
  (all of 127.0.0.0/8 routes to `lo` on Linux, so every host gets its own address);
- VNI = `vni_base + VLAN`; default vni_base 10000, so VLAN 100 is VNI 10100.
"""

from __future__ import annotations

import ipaddress
import struct

# Host names and VTEP addresses have one home; vxlan.vtep_ip / host_of_vtep stay callable here.
from dvswitch.naming import host_number, host_of_vtep, vtep_ip  # noqa: F401

TPID_8021Q = 0x8100
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_RARP = 0x8035
# IEEE 802 local experimental ethertypes: frames of the traffic generator, and the switch's
# link notices to a VM's vNIC ("your port is up on host X").
ETHERTYPE_TEST = 0x88B5
ETHERTYPE_LINK = 0x88B6

VXLAN_PORT = 4789
VXLAN_HDR_BYTES = 8
VXLAN_FLAG_I = 0x08
MAX_VNI = (1 << 24) - 1

ETH_HDR_BYTES = 14
TAGGED_HDR_BYTES = 18
MIN_PAYLOAD_BYTES = 46  # Ethernet minimum (64 bytes with FCS); shorter payloads are padded
# Largest frame a vNIC may send, in bytes (tagged, no FCS): jumbo 9000-byte payload + headers.
MAX_FRAME_BYTES = 9_018
BROADCAST = 0xFFFF_FFFF_FFFF
MAX_VLAN = 4094

_TAG = struct.Struct("!HH")
_VXLAN = struct.Struct("!B3xI")


class FrameError(ValueError):
    """Bytes that are not a frame we switch: dropped and counted by the caller."""


def mac_bytes(mac: int) -> bytes:
    return mac.to_bytes(6, "big")


def is_group(mac: int) -> bool:
    """Broadcast or multicast: the I/G bit, the lowest bit of the first octet."""
    return bool((mac >> 40) & 1)


def parse_tagged(frame: bytes) -> tuple[int, int, int, int]:
    """(dst, src, vlan, ethertype) of a tagged frame from a vNIC; FrameError if it is not one."""
    n = len(frame)
    if n < TAGGED_HDR_BYTES:
        raise FrameError(f"frame of {n} bytes is shorter than a tagged Ethernet header")
    if n > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {n} bytes is over {MAX_FRAME_BYTES}")
    tpid, tci = _TAG.unpack_from(frame, 12)
    if tpid != TPID_8021Q:
        raise FrameError(f"untagged frame (ethertype 0x{tpid:04x}); vNICs send 802.1Q-tagged frames")
    vlan = tci & 0x0FFF
    if not 1 <= vlan <= MAX_VLAN:
        raise FrameError(f"VLAN {vlan} out of range")
    src = int.from_bytes(frame[6:12], "big")
    if is_group(src):
        raise FrameError("group (multicast) source MAC")
    return int.from_bytes(frame[0:6], "big"), src, vlan, (frame[16] << 8) | frame[17]


def build_tagged(dst: int, src: int, vlan: int, ethertype: int, payload: bytes) -> bytes:
    if len(payload) < MIN_PAYLOAD_BYTES:
        payload = payload + bytes(MIN_PAYLOAD_BYTES - len(payload))
    return mac_bytes(dst) + mac_bytes(src) + _TAG.pack(TPID_8021Q, vlan & 0x0FFF) + ethertype.to_bytes(2, "big") + payload


def vni_of(vlan: int, vni_base: int) -> int:
    return vni_base + vlan


def vlan_of(vni: int, vni_base: int) -> int | None:
    vlan = vni - vni_base
    return vlan if 1 <= vlan <= MAX_VLAN else None


def encap(frame: bytes, vni: int) -> bytes:
    """A tagged frame → a VXLAN payload (UDP data): header + the inner frame untagged."""
    return _VXLAN.pack(VXLAN_FLAG_I, vni << 8) + frame[:12] + frame[16:]


def decap(datagram: bytes) -> tuple[int, bytes]:
    """A VXLAN payload → (vni, inner untagged frame); FrameError if malformed."""
    n = len(datagram)
    if n < VXLAN_HDR_BYTES + ETH_HDR_BYTES:
        raise FrameError(f"VXLAN datagram of {n} bytes is too short")
    if n > VXLAN_HDR_BYTES + MAX_FRAME_BYTES:
        raise FrameError(f"VXLAN datagram of {n} bytes is too long")
    flags, word = _VXLAN.unpack_from(datagram, 0)
    if not flags & VXLAN_FLAG_I:
        raise FrameError("VXLAN I flag not set (no valid VNI)")
    inner = datagram[VXLAN_HDR_BYTES:]
    if (inner[12] << 8 | inner[13]) == TPID_8021Q:
        raise FrameError("inner frame carries an 802.1Q tag (RFC 7348 §6.1: discard)")
    if is_group(int.from_bytes(inner[6:12], "big")):
        raise FrameError("group (multicast) inner source MAC")
    return word >> 8, inner


def retag(inner: bytes, vlan: int) -> bytes:
    """An untagged inner frame → the tagged frame delivered to a VM port in `vlan`."""
    return inner[:12] + _TAG.pack(TPID_8021Q, vlan) + inner[12:]


def rarp(mac: int, vlan: int) -> bytes:
    """The RARP broadcast a hypervisor sends for a VM that just arrived (as vMotion does), so
    learning switches on the way point the VM's MAC at its new port: opcode 3 (request reverse),
    sender = target = the VM's MAC, protocol addresses 0.0.0.0."""
    m = mac_bytes(mac)
    body = struct.pack("!HHBBH", 1, ETHERTYPE_IPV4, 6, 4, 3) + m + bytes(4) + m + bytes(4)
    return build_tagged(BROADCAST, mac, vlan, ETHERTYPE_RARP, body)


_LINK = struct.Struct("!4sQB")
LINK_MAGIC = b"DVSL"


def link_notice(vm_mac: int, switch_mac: int, vlan: int, host: str, t_ns: int) -> bytes:
    """The switch tells a VM's vNIC its port is up on `host` (since monotonic `t_ns`)."""
    h = host.encode()[:255]
    return build_tagged(vm_mac, switch_mac, vlan, ETHERTYPE_LINK, _LINK.pack(LINK_MAGIC, t_ns, len(h)) + h)


def parse_link_notice(frame: bytes) -> tuple[str, int] | None:
    """(host, t_ns) of a link notice frame, None if it is not one."""
    if len(frame) < TAGGED_HDR_BYTES + _LINK.size or (frame[16] << 8 | frame[17]) != ETHERTYPE_LINK:
        return None
    magic, t_ns, n = _LINK.unpack_from(frame, TAGGED_HDR_BYTES)
    if magic != LINK_MAGIC:
        return None
    start = TAGGED_HDR_BYTES + _LINK.size
    try:
        return frame[start : start + n].decode(), t_ns
    except UnicodeDecodeError:
        return None


def switch_mac(host: str) -> int:
    """A locally administered MAC for the switch itself (source of its link notices)."""
    return 0x02_FE_00_00_00_00 | (host_number(host) or 0)


# ---------------------------------------------------------------------- addressing


def parse_vtep_map(obj: object) -> dict[str, str]:
    """An explicit host -> VTEP IPv4 address map (the JSON object of a `--vteps` file), checked:
    ValueError naming the first bad entry. No arithmetic: any host id, any address, as long as
    no two hosts share one (a datagram's source address must name exactly one host)."""
    if not isinstance(obj, dict):
        raise ValueError("a VTEP map is a JSON object {host: IPv4 address}")
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for host, ip in obj.items():
        if not isinstance(host, str) or not 0 < len(host) <= 64:
            raise ValueError(f"bad host id {host!r} in the VTEP map")
        try:
            if not isinstance(ip, str):
                raise TypeError
            addr = str(ipaddress.IPv4Address(ip))
        except (ipaddress.AddressValueError, ValueError, TypeError):
            raise ValueError(f"VTEP of {host} is {ip!r}, not an IPv4 address") from None
        if addr in seen:
            raise ValueError(f"{seen[addr]} and {host} have the same VTEP {addr}")
        seen[addr] = host
        out[host] = addr
    return out
