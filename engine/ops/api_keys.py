"""API keys of the running system, from the command line (``make api-key NAME=alice``).

    python -m engine.ops.api_keys create NAME [--rate CALLS_PER_SEC] [--burst CALLS]
    python -m engine.ops.api_keys list
    python -m engine.ops.api_keys revoke KEY_ID_OR_NAME

It finds the system's Redis as the service does: ``REDIS_URL``, else the embedded
redis-server that ``make run`` started under ``DATA_DIR`` (it must be running).
``create`` prints the new key and nothing else on stdout (so ``KEY=$(make -s
api-key NAME=bob)`` works); the key is shown this once, and Redis keeps only its
digest. ``list`` shows names and ids, never keys. Exit codes: 0 done, 1 the request
was refused (a bad name, no such key), 2 bad usage or configuration, 3 Redis could
not be reached or refused the command (out of memory, read-only...).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import sys
import time
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit, urlunsplit

import redis.exceptions
from redis.asyncio import Redis

from engine.core.accounts import ApiKeyError, ApiKeys, KeyRecord
from engine.core.config import Config, ConfigError
from engine.ops.redis_server import running_url

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
# The embedded redis-server's folder under DATA_DIR (server.py starts it there).
EMBEDDED_REDIS_DIR = "redis"


def embedded_redis_dir(data_dir: Path) -> Path:
    """Where embedded mode keeps its redis-server's data (and URL file)."""
    return data_dir / EMBEDDED_REDIS_DIR


def redis_url(config: Config) -> str | None:
    """REDIS_URL, or the running embedded Redis's URL; None if there is neither."""
    return config.redis_url or running_url(embedded_redis_dir(config.data_dir))


def shown_url(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{netloc}"))


def _connect(url: str) -> Redis:
    """A client for one short task (a command, the dev key's check): it waits longer
    than the service's request path would, a CLI has nobody waiting on it."""
    return Redis.from_url(url, decode_responses=True, socket_timeout=5.0, socket_connect_timeout=2.0)


# Embedded mode's development key: created on the first start, kept in this file
# under DATA_DIR (mode 0600); engine.client reads it when given no key.
DEV_KEY_FILE = "dev-api-key"
DEV_KEY_NAME = "dev"


def store_key(url: str, name: str, key: str, *, rate: float | None = None, burst: int | None = None) -> None:
    """Store a given ``key`` (made elsewhere: a test's or the bench's fixed key) in the
    Redis at ``url``, as ApiKeys.create(key=...) does. Blocking; it runs its own event
    loop in a thread of its own, so a caller inside a running loop may call it too.
    Raises ApiKeyError, and what redis-py raises."""

    async def store() -> None:
        client = _connect(url)
        try:
            await ApiKeys(client, Config()).create(name, key=key, rate=rate, burst=burst)
        finally:
            await client.aclose()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, store()).result()


def dev_key_path(data_dir: Path) -> Path:
    """Where embedded mode keeps its development key: DEV_KEY_FILE under DATA_DIR."""
    return data_dir / DEV_KEY_FILE


async def ensure_dev_key(config: Config, url: str) -> tuple[Path, bool]:
    """Embedded mode: make sure DEV_KEY_FILE holds a live key of this system's Redis,
    creating one (named DEV_KEY_NAME) if the file is missing or its key is not live
    (revoked, or Redis's data is gone). Returns the file and whether a key was made."""
    path = dev_key_path(config.data_dir)
    client = _connect(url)
    api_keys = ApiKeys(client, config)
    try:
        try:
            existing = path.read_text().strip()
        except OSError:
            existing = ""
        if existing and await api_keys.is_live(existing):
            return path, False
        key = await api_keys.create(DEV_KEY_NAME)
    finally:
        await client.aclose()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(key + "\n")
    partial.replace(path)
    return path, True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.ops.api_keys", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a key; prints it (once) on stdout")
    create.add_argument("name", help="who or what the key is for (letters, digits, . _ @ -)")
    create.add_argument("--rate", type=float, help="its own rate limit: calls a second on average")
    create.add_argument("--burst", type=int, help="its own rate limit: calls at once")
    commands.add_parser("list", help="every key: id, name, created, limits, revoked")
    revoke = commands.add_parser("revoke", help="revoke a key, by id or by its (unique) name")
    revoke.add_argument("key", help="the key's id (from list), or its name")
    return parser.parse_args(argv)


def _when(epoch: float | None) -> str:
    return "-" if epoch is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def format_list(records: list[KeyRecord], config: Config) -> str:
    """The keys as a table (what ``list`` prints)."""
    rows = [("ID", "NAME", "CREATED", "RATE/S", "BURST", "REVOKED")]
    for record in records:
        rows.append((
            record.key_id,
            record.name,
            _when(record.created_at),
            f"{record.rate:g}" if record.rate is not None else f"{config.rate_limit_per_sec:g} (default)",
            str(record.burst) if record.burst is not None else f"{config.rate_limit_burst} (default)",
            _when(record.revoked_at),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                   + "\n" for row in rows)


async def run(args: argparse.Namespace, config: Config, url: str, out: TextIO, err: TextIO) -> int:
    """Do one command (``args``) against the Redis at ``url``: the key or the table on
    ``out``, what was done on ``err``. Returns the exit code; Redis errors propagate."""
    client = _connect(url)
    api_keys = ApiKeys(client, config)
    try:
        if args.command == "create":
            key = await api_keys.create(args.name, rate=args.rate, burst=args.burst)
            out.write(key + "\n")
            err.write(f"created API key {key.split('_')[1]} named {args.name!r}; it is shown only "
                      "this once: keep it secret\n")
        elif args.command == "list":
            out.write(format_list(await api_keys.records(), config))
        else:
            record = await api_keys.revoke(args.key)
            err.write(f"revoked API key {record.key_id} ({record.name!r})\n")
    except ApiKeyError as exc:
        err.write(f"api-key: {exc}\n")
        return EXIT_REFUSED
    finally:
        await client.aclose()
    return EXIT_OK


def main(argv: list[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """The CLI: parse ``argv``, find Redis, run the command; the exit code (module
    docstring)."""
    args = parse_args(argv)
    try:
        config = Config.from_env()
    except ConfigError as exc:
        err.write(f"api-key: configuration error: {exc}\n")
        return EXIT_USAGE
    url = redis_url(config)
    if url is None:
        err.write(
            f"api-key: no running system found: set REDIS_URL, or start it with `make run` "
            f"(embedded mode, data in {config.data_dir})\n"
        )
        return EXIT_UNREACHABLE
    try:
        return asyncio.run(run(args, config, url, out, err))
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        err.write(f"api-key: cannot reach Redis at {shown_url(url)}: {exc}\n")
        return EXIT_UNREACHABLE
    except redis.exceptions.RedisError as exc:  # e.g. OOM, MISCONF, READONLY: nothing done
        err.write(f"api-key: Redis at {shown_url(url)} refused: {exc}\n")
        return EXIT_UNREACHABLE


if __name__ == "__main__":
    sys.exit(main())
