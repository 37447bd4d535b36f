"""Sub-millisecond sleeps for an asyncio loop (Linux timerfd), for open-loop timetables.

``asyncio.sleep`` wakes through ``epoll_wait``, whose timeout is whole milliseconds
(rounded up): at 1,000 req/s every request would leave up to 1 ms late, on average
about 0.5 ms, which is as much as a fast server's whole answer time and would
squash the ratio between two servers towards 1. A timerfd armed at an absolute
``CLOCK_MONOTONIC`` time (the clock ``time.monotonic()`` reads) wakes the loop
within tens of microseconds instead, without spinning a CPU.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import time

CLOCK_MONOTONIC = 1
TFD_NONBLOCK = 0o4000
TFD_CLOEXEC = 0o2000000
TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class PreciseSleeper:
    """``await sleeper.until(t)`` returns at ``time.monotonic() >= t``, within ~0.1 ms."""

    def __init__(self) -> None:
        self._fd = -1
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            self._settime = libc.timerfd_settime
            fd = libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
            if fd >= 0:
                self._fd = fd
        except (OSError, AttributeError):
            self._fd = -1

    @property
    def precise(self) -> bool:
        """False where timerfd is missing (then plain asyncio.sleep is used)."""
        return self._fd >= 0

    async def until(self, deadline: float) -> None:
        delay = deadline - time.monotonic()
        if delay <= 0:
            return
        if self._fd < 0:
            await asyncio.sleep(delay)
            return
        spec = _Itimerspec()
        spec.it_value.tv_sec = int(deadline)
        spec.it_value.tv_nsec = int((deadline - int(deadline)) * 1e9)
        if self._settime(self._fd, TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
            await asyncio.sleep(delay)
            return
        loop = asyncio.get_running_loop()
        fired: asyncio.Future[None] = loop.create_future()

        def on_readable() -> None:
            try:
                os.read(self._fd, 8)
            except BlockingIOError:
                return
            if not fired.done():
                fired.set_result(None)

        loop.add_reader(self._fd, on_readable)
        try:
            await fired
        finally:
            loop.remove_reader(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
