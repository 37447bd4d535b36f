"""Logging set-up shared by the web and worker processes.

Log records never touch stderr on the event loop: the loop only puts each record on a
bounded queue (the standard library's ``QueueHandler``), and a ``QueueListener``
thread formats and writes it. A synchronous write per line cost the event loop most
of the tail latency a user met (issue 17: POST p99 28-35 ms as `make run` runs it,
6.6 ms with LOG_LEVEL=WARNING); a full pipe (a slow terminal, a stalled log
collector) would block it outright. If the writer falls LOG_QUEUE_MAX records behind,
further records are dropped and counted, and the writer says how many once it
catches up: the service keeps serving rather than wait for its log.
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import os
import queue
import sys
import threading
import time
from logging.handlers import QueueHandler, QueueListener

from engine.core.config import Config

# Records waiting for the writer thread; past this, new ones are dropped (counted).
LOG_QUEUE_MAX = 10_000
# How long a stopping process waits for its queued records to be written.
STOP_TIMEOUT_SECS = 5.0


class JSONFormatter(logging.Formatter):
    """One JSON object per line, for log collectors (LOG_FORMAT=json)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry)


class NonBlockingHandler(QueueHandler):
    """A QueueHandler that never waits: the record's message and traceback are
    rendered now (its arguments may change once the caller goes on), and a full queue
    drops the record instead of blocking (``dropped`` counts them)."""

    def __init__(self, log_queue: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(log_queue)
        self.dropped = 0
        self._lock_dropped = threading.Lock()

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        prepared = copy.copy(record)
        prepared.msg = record.getMessage()
        prepared.args = None
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            prepared.exc_text = record.exc_text
            prepared.exc_info = None
        return prepared

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            with self._lock_dropped:
                self.dropped += 1

    def take_dropped(self) -> int:
        """How many records were dropped since the last call."""
        with self._lock_dropped:
            dropped, self.dropped = self.dropped, 0
        return dropped


class _Writer(logging.StreamHandler):  # type: ignore[type-arg]
    """The listener's handler: writes each record, and first a line saying how many
    records were dropped since the last one it wrote, if any."""

    def __init__(self, source: NonBlockingHandler) -> None:
        super().__init__(sys.stderr)
        self.source = source

    def emit(self, record: logging.LogRecord) -> None:
        dropped = self.source.take_dropped()
        if dropped:
            notice = logging.LogRecord(
                "engine.ops.logs", logging.WARNING, __file__, 0,
                "%d log records dropped: the log writer fell %d records behind", (dropped, LOG_QUEUE_MAX),
                None,
            )
            super().emit(notice)
        super().emit(record)


class _Listener(QueueListener):
    """QueueListener whose stop waits at most STOP_TIMEOUT_SECS for the writer (a
    stalled stderr must not hang a process's exit), then leaves the daemon thread."""

    def __init__(self, log_queue: queue.Queue[logging.LogRecord], writer: logging.Handler) -> None:
        super().__init__(log_queue, writer)
        self._log_queue = log_queue

    def enqueue_sentinel(self) -> None:
        try:
            self._log_queue.put(None, timeout=STOP_TIMEOUT_SECS)  # type: ignore[arg-type]
        except queue.Full:
            pass

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self.enqueue_sentinel()
        thread.join(STOP_TIMEOUT_SECS)
        self._thread = None


_TRACEBACKS = logging.Formatter()
# The writer thread of this process, and the process that started it: a forked child
# inherits the object but not the thread (nor may it touch the queue's locks).
_listener: QueueListener | None = None
_listener_pid = 0


def setup_logging(config: Config, process: str, *, queued: bool = True) -> None:
    """Log to stderr at the configured level, as text or JSON lines, through a writer
    thread (see the module's docstring); with ``queued`` False, synchronously, for a
    process about to fork (a pre-fork supervisor serves no requests, and a fork must
    not copy a thread in the middle of a write). Calling it again replaces the
    previous set-up; ``stop_logging`` flushes it, and runs at exit."""
    global _listener, _listener_pid
    stop_logging()
    if config.log_format == "json":
        formatter: logging.Formatter = JSONFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter(f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(config.log_level)
    if not queued:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(formatter)
        root.handlers[:] = [stream]
        return
    log_queue: queue.Queue[logging.LogRecord] = queue.Queue(LOG_QUEUE_MAX)
    handler = NonBlockingHandler(log_queue)
    writer = _Writer(handler)
    writer.setFormatter(formatter)
    root.handlers[:] = [handler]
    _listener, _listener_pid = _Listener(log_queue, writer), os.getpid()
    _listener.start()


def stop_logging() -> None:
    """Write every queued record and stop the writer thread (idempotent; in a forked
    child, only forgets the parent's)."""
    global _listener
    listener, _listener = _listener, None
    if listener is not None and _listener_pid == os.getpid():
        listener.stop()


atexit.register(stop_logging)
