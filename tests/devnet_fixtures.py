"""The ``devnet`` fixture: one anvil with the real Uniswap V2 contracts deployed
(engine.ops.devnet), for the whole test session.

Without anvil or the contracts' artifacts (``make devnet-deps``, which needs npm) the
fixture fails with that message: CI has npm, so a missing devnet is an error, never a skip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest

from engine.ops.devnet import Anvil, DevnetError, deploy
from engine.ops.redis_server import free_port


@dataclasses.dataclass(frozen=True)
class DevnetHandle:
    """The session's devnet: its JSON-RPC URL, the chain file's document, the process."""

    url: str
    doc: dict[str, Any]
    anvil: Anvil


@pytest.fixture(scope="session")
def devnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevnetHandle]:
    """anvil on a free port (automine), deployed once; stopped at the end of the session."""
    anvil = Anvil(free_port(), data_dir=tmp_path_factory.mktemp("anvil"))
    try:
        anvil.start()
        doc = deploy(anvil.url)
    except DevnetError as exc:
        anvil.stop()
        pytest.fail(f"the devnet did not start: {exc}", pytrace=False)
    try:
        yield DevnetHandle(anvil.url, doc, anvil)
    finally:
        anvil.stop()
