"""Journal group commit: records made durable off the event loop, messages held until they are.

The rule the controller keeps is "durable before anyone hears of it": a message the core
queued after a journal record goes out only once that record is on disk. Done inline, every
tick with a record paid a whole fsync on the event loop (on this machine's virtual disk ~1-3 ms
each, two per move: 4.75 ms of a profiled move's 5.1 ms), so at a few hundred moves/s the
controller spent more time in fsync than the load allowed.

Here one worker thread writes and fsyncs; while it does, the loop goes on reading reports and
taking decisions, and every record the core journals meanwhile goes in the next fsync (a group
commit: one fsync for all of them). Messages are tagged with the generation of the last record
queued before them and released, in order, once that generation is durable. A message that
follows no unsynced record (nothing journaled since the last fsync and nothing held) goes at
once, as before.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import BinaryIO

log = logging.getLogger("controller")


class GroupCommit:
    def __init__(self, loop: asyncio.AbstractEventLoop, file: BinaryIO,
                 send: Callable[[list], None]) -> None:
        self.loop = loop
        self.file = file
        self.send = send  # send(messages): what the loop does with a released batch
        self._pending: list[bytes] = []  # encoded records not yet handed to the thread
        self._gen = 0  # generation of the last record queued
        self._synced = 0  # ...and of the last one on disk
        self._held: deque[tuple[int, list]] = deque()  # (generation it waits for, messages)
        self._busy = False
        # One writer thread, fed through a queue and answering with call_soon_threadsafe: no
        # futures or executor on the hot path (they were ~5 % of the controller's Python time).
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._writer, name="journal", daemon=True)
        self._thread.start()
        self.fsyncs = 0  # fsync calls made (one per group)

    def submit(self, data: bytes, messages: list) -> None:
        """`data`: the encoded records of this tick (b"" for none); `messages`: what the core
        queued after them, sent once they are durable."""
        if data:
            self._pending.append(data)
            self._gen += 1
        if messages:
            if self._gen == self._synced and not self._held:
                self.send(messages)
            else:
                self._held.append((self._gen, messages))
        self._start()

    def _start(self) -> None:
        if self._busy or not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._busy = True
        self._work.put((self._gen, data))

    def _writer(self) -> None:  # (the worker thread)
        while True:
            item = self._work.get()
            if item is None:
                return
            gen, data = item
            try:
                self._write(data)
                exc = None
            except Exception as e:  # (any: this thread must live on, and the loop must hear of it)
                exc = e
            try:
                self.loop.call_soon_threadsafe(self._done, gen, exc)
            except RuntimeError:
                return  # the loop is closed: we are shutting down (close() writes what is left)

    def _write(self, data: bytes) -> None:
        self.file.write(data)
        self.file.flush()
        os.fsync(self.file.fileno())

    def _done(self, gen: int, exc: BaseException | None) -> None:
        self._busy = False
        if exc is not None:
            # As when this was inline: the records are lost to the journal (said loudly) and
            # the messages still go, or the moves they carry would stall until they time out.
            log.error("journal write failed: %s: %s", type(exc).__name__, exc)
        else:
            self.fsyncs += 1
        self._synced = max(self._synced, gen)
        self._release()
        self._start()

    def _release(self) -> None:
        held = self._held
        while held and held[0][0] <= self._synced:
            self.send(held.popleft()[1])

    def close(self) -> None:
        """Make everything durable and send what waited for it (at shutdown: synchronous)."""
        self._work.put(None)
        self._thread.join()  # (the write in flight, if any, is on disk after this)
        self._busy = False
        if self._pending:
            try:
                self._write(b"".join(self._pending))
            except OSError as e:
                log.error("journal write failed: %s: %s", type(e).__name__, e)
            self._pending.clear()
        self._synced = self._gen
        self._release()
