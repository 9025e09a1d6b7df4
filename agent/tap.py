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

Which queue the VM's frames go to: a multi-queue TAP steers each flow to the queue that last
wrote it, and removing a queue renumbers the others (the last one takes the removed one's
index) while, for a moment, frames keep being steered by the old numbers: those the kernel sends
to the index that just went away are dropped (seen: 3 of ~5,700 pings over 30 moves, all counted
in the VM's tx_dropped). So every agent installs a steering program (TUNSETSTEERINGEBPF, a
two-instruction eBPF socket filter that returns 0) that sends every frame to queue 0: the old
host's until it closes its queue, then the new host's, which takes index 0 in the same step.
Index 0 always exists while any queue does; what the old host has not read when it closes is
the only exposure, and it reads its queue empty first. The price: until the old host closes its
queue (milliseconds after switchover, when its DETACH arrives) the VM's frames still reach the
switch through it, as departed-VM ingress; an old host that is paused (SIGSTOP) rather than dead
keeps them until it resumes and lets go. (A real VM would be paused with its host.)

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
import platform
import struct

from agent import vxlan

TUN_PATH = "/dev/net/tun"
NETNS_DIR = "/run/netns"
# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETQUEUE = 0x400454D9
TUNSETSTEERINGEBPF = 0x800454E0
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

# bpf(2): its syscall number per architecture (no libc wrapper exists).
_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SOCKET_FILTER = 1
# r0 = 0; exit: "queue 0" (eBPF: opcode, dst|src regs, 16-bit offset, 32-bit immediate).
_STEER_TO_QUEUE_0 = struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0)

_libc = None
_steer_fd: int | None = None
steering_error: str | None = None  # why the last steering program could not be installed, if so


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        setns(fd, CLONE_NEWNET)
        return
    if _c().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _steering_prog() -> int:
    """The fd of the loaded "queue 0" program (loaded once per process)."""
    global _steer_fd
    if _steer_fd is None:
        nr = _BPF_SYSCALL.get(platform.machine())
        if nr is None:
            raise OSError(errno.ENOSYS, f"no bpf(2) syscall number known for {platform.machine()}")
        insns = ctypes.create_string_buffer(_STEER_TO_QUEUE_0)
        license_ = ctypes.create_string_buffer(b"GPL")
        # union bpf_attr, BPF_PROG_LOAD: prog_type, insn_cnt, insns, license (the rest zero).
        attr = ctypes.create_string_buffer(struct.pack("<IIQQ", BPF_PROG_TYPE_SOCKET_FILTER,
                                                       len(_STEER_TO_QUEUE_0) // 8, ctypes.addressof(insns),
                                                       ctypes.addressof(license_)) + bytes(96))
        fd = _c().syscall(ctypes.c_long(nr), ctypes.c_int(BPF_PROG_LOAD), attr, ctypes.c_uint(len(attr.raw)))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"bpf(BPF_PROG_LOAD): {os.strerror(err)}")
        _steer_fd = fd
    return _steer_fd


def steer_to_queue_0(fd: int) -> None:
    """Make the TAP behind queue `fd` send every frame of its VM to queue 0 (see the module notes)."""
    fcntl.ioctl(fd, TUNSETSTEERINGEBPF, struct.pack("i", _steering_prog()))


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
        global steering_error
        try:
            steer_to_queue_0(fd)
        except OSError as e:  # the TAP still works; moves may then drop a frame now and then
            steering_error = str(e)
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
