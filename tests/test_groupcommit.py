"""The journal's group commit (controller/groupcommit.py): nothing that follows a record leaves
before that record is fsynced; records journaled while an fsync runs share the next one; the
messages keep their order; a stop makes everything durable and sends what waited."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from controller import groupcommit
from controller.groupcommit import GroupCommit


class Disk:
    """os.fsync stand-in: records what the file held at each fsync, and can hold an fsync until
    the test lets it go (to pile records up behind it)."""

    def __init__(self, path) -> None:
        self.path = path
        self.synced: list[bytes] = []  # the file's bytes at each fsync
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def fsync(self, fd: int) -> None:
        self.entered.set()
        self.gate.wait(10)
        self.synced.append(self.path.read_bytes())


@pytest.fixture
def disk(tmp_path, monkeypatch):
    d = Disk(tmp_path / "journal")
    monkeypatch.setattr(groupcommit.os, "fsync", d.fsync)
    return d


async def _until(cond, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.005)):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


async def test_messages_wait_for_their_records_and_keep_order(disk) -> None:
    loop = asyncio.get_running_loop()
    sent: list[tuple[str, int]] = []  # (message, how many fsyncs had completed when it left)
    with open(disk.path, "ab") as f:
        gc = GroupCommit(loop, f, lambda msgs: sent.extend((m, len(disk.synced)) for m in msgs))
        gc.submit(b"", ["hello"])  # nothing journaled: goes at once
        assert sent == [("hello", 0)]
        disk.gate.clear()
        gc.submit(b"r1\n", ["after-r1"])
        await loop.run_in_executor(None, disk.entered.wait, 5)  # the fsync of r1 is under way
        gc.submit(b"r2\n", ["after-r2"])
        gc.submit(b"r3\n", [])
        gc.submit(b"", ["no-record-but-behind-r3"])  # nothing of its own: still behind the rest
        assert [m for m, _ in sent] == ["hello"]
        disk.gate.set()
        await _until(lambda: len(sent) == 4)
        gc.close()
    assert [m for m, _ in sent] == ["hello", "after-r1", "after-r2", "no-record-but-behind-r3"]
    # r1 alone in the first fsync; r2 and r3, journaled meanwhile, share the second.
    assert disk.synced == [b"r1\n", b"r1\nr2\nr3\n"]
    assert gc.fsyncs == 2
    # Each message left only after the fsync that holds its records.
    assert dict(sent) == {"hello": 0, "after-r1": 1, "after-r2": 2, "no-record-but-behind-r3": 2}


async def test_close_makes_pending_records_durable_and_sends_what_waited(disk) -> None:
    loop = asyncio.get_running_loop()
    sent: list[str] = []
    with open(disk.path, "ab") as f:
        gc = GroupCommit(loop, f, sent.extend)
        disk.gate.clear()
        gc.submit(b"a\n", ["m1"])
        await loop.run_in_executor(None, disk.entered.wait, 5)
        gc.submit(b"b\n", ["m2"])  # queued behind the fsync in flight
        disk.gate.set()
        gc.close()  # (the loop never ran the first write's callback)
    assert disk.path.read_bytes() == b"a\nb\n"
    assert disk.synced[-1] == b"a\nb\n"
    assert sent == ["m1", "m2"]


async def test_a_failed_write_is_logged_and_the_messages_still_go(tmp_path, caplog) -> None:
    loop = asyncio.get_running_loop()
    sent: list[str] = []
    r, w = os.pipe()
    os.close(r)
    f = os.fdopen(w, "ab")  # writing to a pipe nobody reads: EPIPE
    gc = GroupCommit(loop, f, sent.extend)
    gc.submit(b"x\n", ["m"])
    await _until(lambda: sent == ["m"])
    assert "journal write failed" in caplog.text
    gc.close()
    try:
        f.close()
    except OSError:
        pass
