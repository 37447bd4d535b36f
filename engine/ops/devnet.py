"""A local EVM devnet for MARKET=evm: anvil with the real Uniswap V2 contracts.

anvil and the contracts' build artifacts come from npm (``devnet/package.json``,
installed into ``devnet/node_modules`` by ``make devnet-deps``); nothing of them is
copied into the repository. ``deploy`` (engine.ops.devnet_deploy) puts on a fresh anvil: WETH9, the API's six
tokens as ERC-20s with their decimals (OpenZeppelin 2.5.1's ERC20DetailedMock, funded
by writing its storage), and two venues, each a UniswapV2Factory and a
UniswapV2Router02 with a pool for each of the 15 pairs. ``python -m engine.ops.devnet``
runs it all, with a background trader (engine.ops.devnet_trader) moving the prices.

Here: the anvil process, the chain file (schemas/evm_chain.json), ``Devnet`` (what the
launcher runs) and ``main``. Units: token amounts are base units (``int``,
``amount * 10**decimals``) unless a name says ``usd``; times are seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Coroutine, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from engine.core.config import PROJECT_ROOT, Config
from engine.execution.venues.evm_chain import NODE_MODULES
from engine.ops.devnet_deploy import (
    ARTIFACTS,
    VENUES,
    DevnetError,
    address_of,
    deploy,
    load_artifact,
)
from engine.ops.devnet_keys import DEPLOYER_KEY, OTHER_KEY, TRADER_KEY, WALLET_KEY
from engine.ops.devnet_trader import run_trader
from engine.ops.redis_server import die_with_parent, stop_process

# The public API: what this module defines and what it re-exports.
__all__ = [
    "ANVIL_BIN", "ARTIFACTS", "CHAIN_ID", "DEPLOYER_KEY", "OTHER_KEY", "TRADER_KEY", "VENUES",
    "WALLET_KEY", "Anvil", "Devnet", "DevnetError", "address_of", "deploy",
    "load_artifact", "main", "run_trader", "write_chain_file",
]

logger = logging.getLogger(__name__)

ANVIL_BIN = NODE_MODULES / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"
CHAIN_ID = 31337
START_TIMEOUT_SECS = 20.0
STOP_TIMEOUT_SECS = 5.0


def _port_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port``. SO_REUSEADDR, as anvil binds:
    connections of a devnet just stopped, still in TIME_WAIT, do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Anvil:
    """One anvil child process on 127.0.0.1:``port``; automine unless ``block_time_secs``
    > 0. Its output goes to ``data_dir / "anvil.log"`` (else a temporary file)."""

    def __init__(self, port: int, *, block_time_secs: float = 0, data_dir: Path | None = None,
                 state_path: Path | None = None) -> None:
        self.port = port
        self.block_time_secs = block_time_secs
        self.data_dir = data_dir
        # anvil --state: the chain is loaded from this file if it exists, and written
        # to it on exit (a restarted node keeps its chain).
        self.state_path = state_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [str(ANVIL_BIN), "--port", str(self.port), "--host", "127.0.0.1",
               "--chain-id", str(CHAIN_ID), "--silent"]
        if self.block_time_secs > 0:
            cmd += ["--block-time", str(self.block_time_secs)]
        if self.state_path is not None:
            cmd += ["--state", str(self.state_path)]
        return cmd

    def start(self) -> str:
        """Start anvil and wait until it answers ``eth_chainId``; its URL. Raises DevnetError."""
        if not ANVIL_BIN.is_file():
            raise DevnetError(f"no anvil at {ANVIL_BIN}: run `make devnet-deps`")
        if not _port_free(self.port):
            # Checked first: an anvil already there would answer for the one started here.
            raise DevnetError(f"port {self.port} on 127.0.0.1 is in use (another devnet? "
                              "set DEVNET_PORT)")
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(self.data_dir / "anvil.log", "a+b")  # closed in stop()
        else:
            self._log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            # Out of the terminal's process group: Ctrl-C reaches the launcher, which
            # stops anvil after the processes that use it.
            start_new_session=True, preexec_fn=die_with_parent,
        )
        self._wait_ready()
        logger.info("anvil %s on %s", "automine" if self.block_time_secs <= 0
                    else f"{self.block_time_secs} s blocks", self.url)
        return self.url

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_SECS
        while not self._answers():
            if self.process.poll() is not None:
                code = self.process.returncode
                tail = self._tail()
                self.stop()
                raise DevnetError(f"anvil exited with code {code} on port {self.port}: {tail}")
            if time.monotonic() > deadline:
                tail = self._tail()
                self.stop()
                raise DevnetError(f"anvil did not answer within {START_TIMEOUT_SECS:.0f} s: {tail}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}).encode()
        request = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=0.5) as answer:
                return "result" in json.loads(answer.read())
        except (OSError, ValueError):
            return False

    def _tail(self, size: int = 2000) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(max(0, self._log.seek(0, os.SEEK_END) - size))
        return self._log.read().decode(errors="replace").strip() or "(no output)"

    def stop(self) -> None:
        """SIGTERM anvil, SIGKILL it after STOP_TIMEOUT_SECS."""
        proc, self.process = self.process, None
        if proc is not None and stop_process(proc, STOP_TIMEOUT_SECS):
            logger.warning("anvil did not stop in %s s; killed it", STOP_TIMEOUT_SECS)
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL anvil, as a crash would (for fault tests)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        self.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_chain_file(doc: Mapping[str, Any], path: Path) -> None:
    """Write the chain file atomically (a temporary file beside it, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(json.dumps(doc, indent=2) + "\n")
        tmp.flush()
        os.fsync(tmp.fileno())
    os.chmod(tmp.name, 0o644)  # no secret in it; NamedTemporaryFile made it 0600
    os.replace(tmp.name, path)


class Devnet:
    """anvil on ``config.devnet_port``, deployed, its chain file at ``config.chain_file``.
    The trader is not started here: ``trader()`` is the coroutine to run where the
    caller likes (when ``config.devnet_trader``)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.anvil = Anvil(config.devnet_port, block_time_secs=config.devnet_block_time_secs,
                           data_dir=config.data_dir)
        self.doc: dict[str, Any] = {}

    @property
    def url(self) -> str:
        return self.anvil.url

    def start(self) -> dict[str, Any]:
        """Start anvil, deploy, write the chain file; the chain file's document."""
        self.anvil.start()
        try:
            self.doc = deploy(self.url)
            write_chain_file(self.doc, self.config.chain_file)
        except BaseException:
            self.anvil.stop()
            raise
        return self.doc

    def trader(self, seed: int | None = None) -> Coroutine[Any, Any, None]:
        return run_trader(self.url, self.doc, interval_secs=self.config.devnet_trader_interval_secs,
                          seed=seed)

    def stop(self) -> None:
        self.anvil.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


async def _serve(devnet: Devnet, trade: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    trader = asyncio.create_task(devnet.trader()) if trade else None
    await stop.wait()
    if trader is not None:
        trader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await trader


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.ops.devnet``: anvil, deployed, the trader, until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m engine.ops.devnet", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8545)
    parser.add_argument("--data-dir", type=Path, default=PROJECT_ROOT / "data")
    parser.add_argument("--block-time", type=float, default=0.0, help="seconds; 0 = automine")
    parser.add_argument("--no-trader", action="store_true")
    parser.add_argument("--trader-interval", type=float, default=2.0, help="seconds between swaps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = dataclasses.replace(
        Config(), devnet_port=args.port, data_dir=args.data_dir, devnet_block_time_secs=args.block_time,
        devnet_trader=not args.no_trader, devnet_trader_interval_secs=args.trader_interval)
    try:
        with Devnet(config) as devnet:
            print(f"devnet: {devnet.url} (chain file {config.chain_file})", flush=True)
            asyncio.run(_serve(devnet, config.devnet_trader))
    except DevnetError as exc:
        print(f"devnet: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
