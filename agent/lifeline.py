"""`--parent-pid PID`: a process that belongs to a run (`dvs demo`, `dvs chaos`, `dvs bench`) stops
when that run's process is gone, even if it was SIGKILLed and could not stop its cluster itself.

A pidfd (Linux >= 5.3) becomes readable when the process exits, so the loop is woken once, at
that moment, and never polls. Where pidfds are missing, the pid is polled once a second.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0  # without pidfds: how often the owner's pid is checked, in s


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists, owned by someone else
    return False


def watch_owner(loop: asyncio.AbstractEventLoop, pid: int, on_gone: Callable[[], None]) -> None:
    """Call `on_gone()` on `loop` once process `pid` has exited (at once if it already has)."""

    def gone() -> None:
        log.warning("owner process %d exited; stopping", pid)
        on_gone()

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        loop.call_soon(gone)
        return
    except (AttributeError, OSError):
        def poll() -> None:
            if _gone(pid):
                gone()
            else:
                loop.call_later(POLL_INTERVAL_S, poll)

        loop.call_later(POLL_INTERVAL_S, poll)
        return

    def readable() -> None:
        loop.remove_reader(fd)
        os.close(fd)
        gone()

    loop.add_reader(fd, readable)
