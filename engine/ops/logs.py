"""Logging set-up shared by the web and worker processes.

Log records never touch stderr on the event loop: the loop only renders each record's
message and appends it to a bounded deque, and a writer thread formats and writes
them in batches. A synchronous write per line was most of the tail latency a user met
(issue 17: POST p99 28-35 ms as `make run` runs it, 6.6 ms with LOG_LEVEL=WARNING), and
a full pipe (a slow terminal, a stalled log collector) would block the loop outright.
If the writer falls LOG_QUEUE_MAX records behind, further records are dropped and
counted, and the writer says how many: the service keeps serving rather than wait for
its log.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import sys
import threading
import time

from engine.core.config import Config

# Records waiting for the writer thread; past this, new ones are dropped (counted).
LOG_QUEUE_MAX = 10_000
# The writer writes what waits every FLUSH_SECS, or as soon as WAKE_AT records wait.
FLUSH_SECS = 0.05
WAKE_AT = 1_000
# How long a stopping process waits for its waiting records to be written.
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


_TRACEBACKS = logging.Formatter()


class BatchingHandler(logging.Handler):
    """The event loop's side: a record is rendered (its message, and its traceback if
    any: the arguments may change once the caller goes on) and appended to a deque,
    nothing more: no lock, and no thread woken per record (a ``QueueHandler`` on a
    ``queue.Queue`` wakes its listener for every record, and measured slower than a
    synchronous write). Past LOG_QUEUE_MAX waiting records, new ones are dropped and
    counted."""

    def __init__(self) -> None:
        super().__init__()
        self.records: collections.deque[logging.LogRecord] = collections.deque()
        self.dropped = 0
        self.wake = threading.Event()

    def handle(self, record: logging.LogRecord) -> bool:
        # Handler.handle would take the handler's lock: a deque's append needs none.
        if len(self.records) >= LOG_QUEUE_MAX:
            self.dropped += 1
            return True
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
        self.records.append(record)
        if len(self.records) == WAKE_AT:
            self.wake.set()
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)


class LogWriter(threading.Thread):
    """Formats and writes what a BatchingHandler collected, every FLUSH_SECS (sooner
    when WAKE_AT records wait), in one write per batch; first a line saying how many
    records were dropped since the last batch, if any. A blocked write blocks only
    this thread."""

    def __init__(self, source: BatchingHandler, formatter: logging.Formatter) -> None:
        super().__init__(name="log-writer", daemon=True)
        self.source = source
        self.formatter = formatter
        self.stream = sys.stderr
        self._stopping = False

    def run(self) -> None:
        while not self._stopping:
            self.source.wake.wait(FLUSH_SECS)
            self.source.wake.clear()
            self.write_batch()
        self.write_batch()

    def write_batch(self) -> None:
        source = self.source
        records = []
        while source.records:
            records.append(source.records.popleft())
        dropped, source.dropped = source.dropped, 0
        if not records and not dropped:
            return
        lines = []
        if dropped:
            lines.append(self.formatter.format(logging.makeLogRecord({
                "name": __name__, "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": f"{dropped} log records dropped: the log writer fell {LOG_QUEUE_MAX} behind",
            })))
        lines.extend(self.formatter.format(record) for record in records)
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed or gone: nobody to tell
            pass

    def stop(self, timeout: float) -> None:
        """Write what waits, and end; wait at most ``timeout`` seconds for it."""
        self._stopping = True
        self.source.wake.set()
        self.join(timeout)


# The writer thread of this process, and the process that started it: a forked child
# inherits the object but not the thread.
_writer: LogWriter | None = None
_writer_pid = 0


def setup_logging(config: Config, process: str, *, queued: bool = True) -> None:
    """Log to stderr at the configured level, as text or JSON lines, through a writer
    thread (see the module's docstring); with ``queued`` False, synchronously, for a
    process about to fork (a pre-fork supervisor serves no requests, and a fork must
    not copy a thread in the middle of a write). Calling it again replaces the
    previous set-up; ``stop_logging`` flushes it, and runs at exit."""
    global _writer, _writer_pid
    stop_logging()
    # Not shown by any format here; each costs a look-up per record.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
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
    handler = BatchingHandler()
    root.handlers[:] = [handler]
    _writer, _writer_pid = LogWriter(handler, formatter), os.getpid()
    _writer.start()


def stop_logging() -> None:
    """Write every waiting record and stop the writer thread, waiting for it at most
    STOP_TIMEOUT_SECS (a stalled stderr must not hang an exit); idempotent; in a
    forked child, only forgets the parent's."""
    global _writer
    writer, _writer = _writer, None
    if writer is not None and _writer_pid == os.getpid():
        writer.stop(STOP_TIMEOUT_SECS)


atexit.register(stop_logging)
