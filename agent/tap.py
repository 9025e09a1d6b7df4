"""TAP vNICs: one queue of a VM's multi-queue TAP device, held by the agent of the VM's host.

In `--netns` mode a VM is a network namespace whose only interface is a multi-queue TAP
(IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE) named `eth0`. Every host that runs or receives the VM
opens its own queue of that device: open /dev/net/tun *inside the VM's namespace* (the TUN
device is looked up in the namespace of the thread that opens it) and TUNSETIFF with the name.
A queue can be disabled (TUNSETQUEUE IFF_DETACH_QUEUE: the kernel stops steering the VM's
frames to it, the device keeps its carrier) and enabled again, which is how a move is
make-before-break: the destination opens a disabled queue at prepare and enables it at
switchover; the source reads what is left in its queue and closes it after its port is gone.
The device never loses its carrier during a move, so the VM's kernel keeps its ARP cache.

Frames on a TAP are what the VM's kernel sends: untagged Ethernet II. The switch speaks
802.1Q-tagged frames with its vNICs (agent/vxlan.py), so the agent tags what it reads with the
port's VLAN and strips the tag from what it writes.

Linux only; needs CAP_NET_ADMIN (root) and /dev/net/tun.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct

from agent import vxlan

TUN_PATH = "/dev/net/tun"
NETNS_DIR = "/run/netns"
# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETQUEUE = 0x400454D9
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
CLONE_NEWNET = 0x40000000
IFNAMSIZ = 16
# The VM's interface, the same name in every VM namespace (names are per namespace).
VM_IFNAME = "eth0"
# Largest frame read from a TAP, in bytes: a jumbo frame without its tag.
READ_BYTES = vxlan.MAX_FRAME_BYTES

_libc = None


def _setns(fd: int) -> None:
    global _libc
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        setns(fd, CLONE_NEWNET)
        return
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _ifreq(name: str, flags: int) -> bytes:
    return struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), flags)


def open_queue(netns: str, ifname: str = VM_IFNAME, *, enabled: bool = True) -> int:
    """A new non-blocking queue fd of TAP `ifname` in namespace `netns` (a name under /run/netns).
    Switches only the calling thread into that namespace, and always back (setns(2) on a network
    namespace is per thread). OSError if the namespace or the device is not there."""
    target = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            finally:
                _setns(home)
        finally:
            os.close(home)
    finally:
        os.close(target)
    try:
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(ifname, IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE))
        if not enabled:
            set_enabled(fd, False)
    except OSError:
        os.close(fd)
        raise
    return fd


def set_enabled(fd: int, enabled: bool) -> None:
    """Enable (the kernel may steer the VM's frames to this queue) or disable a queue. Disabling
    drops whatever the queue holds: read it first."""
    fcntl.ioctl(fd, TUNSETQUEUE, _ifreq("", IFF_ATTACH_QUEUE if enabled else IFF_DETACH_QUEUE))


def netns_exists(netns: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, netns))


class TapQueue:
    """One open queue of one VM's TAP: the vNIC backend the data plane knows the VM by."""

    __slots__ = ("fd", "vm", "vlan", "mac", "enabled", "rx_frames", "tx_frames", "dropped")

    def __init__(self, fd: int, vm: str, vlan: int, mac: int, enabled: bool) -> None:
        self.fd = fd
        self.vm = vm
        self.vlan = vlan
        self.mac = mac
        self.enabled = enabled
        self.rx_frames = 0
        self.tx_frames = 0
        self.dropped = 0  # untagged-frame rule broken, or a write the device refused

    def set_enabled(self, enabled: bool) -> None:
        if enabled != self.enabled:
            set_enabled(self.fd, enabled)
            self.enabled = enabled

    def read_frames(self, limit: int) -> list[bytes]:
        """Up to `limit` frames the VM sent, each tagged with the port's VLAN."""
        out = []
        for _ in range(limit):
            try:
                frame = os.read(self.fd, READ_BYTES)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno == errno.EBADFD:  # a disabled queue reads nothing
                    break
                raise
            if len(frame) < vxlan.ETH_HDR_BYTES or (frame[12] << 8 | frame[13]) == vxlan.TPID_8021Q:
                self.dropped += 1  # a runt, or a VM tagging its own frames: not on an access port
                continue
            self.rx_frames += 1
            out.append(vxlan.retag(frame, self.vlan))
        return out

    def write(self, tagged: bytes) -> None:
        """Deliver a tagged frame from the switch to the VM, untagged."""
        try:
            os.write(self.fd, tagged[:12] + tagged[16:])
            self.tx_frames += 1
        except OSError:
            self.dropped += 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def describe(self) -> dict:
        return {"vm": self.vm, "vlan": self.vlan, "mac": self.mac, "enabled": self.enabled,
                "rx_frames": self.rx_frames, "tx_frames": self.tx_frames, "dropped": self.dropped}
