"""The local devnet (engine.ops.devnet): a real anvil with the real Uniswap V2 contracts
from npm, deployed once per session (tests/devnet_fixtures.py). No mocks."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from web3 import Web3

from engine.core import amounts
from engine.execution.venues.evm_chain import ChainFile, EvmSetupError
from engine.ops import devnet as devnet_module
from engine.ops.devnet import (
    WALLET_KEY,
    Anvil,
    DevnetError,
    address_of,
    load_artifact,
    write_chain_file,
)
from engine.ops.devnet_trader import Trader, connect
from engine.ops.redis_server import free_port
from engine.web.schemas import Schemas
from tests.devnet_fixtures import DevnetHandle

SOL = 10**9  # one whole SOL in lamports (SOL has 9 decimals)


def router(w3: Web3, doc: dict[str, Any], venue: str) -> Any:
    abi, _ = load_artifact("UniswapV2Router02")
    return w3.eth.contract(address=doc["venues"][venue]["router"], abi=abi)


def sol_to_usdc(w3: Web3, doc: dict[str, Any], venue: str, lamports: int) -> int:
    """What ``venue``'s router quotes (getAmountsOut) for ``lamports`` SOL, in USDC base units."""
    path = [doc["tokens"]["SOL"]["address"], doc["tokens"]["USDC"]["address"]]
    return int(router(w3, doc, venue).functions.getAmountsOut(lamports, path).call()[-1])


def test_the_chain_file_round_trips_and_validates_against_its_schema(devnet: DevnetHandle, tmp_path: Path) -> None:
    path = tmp_path / "chain" / "devnet.json"
    write_chain_file(devnet.doc, path)
    assert json.loads(path.read_text()) == devnet.doc
    assert ChainFile.load(path) == ChainFile.from_doc(devnet.doc)  # what a worker reads
    assert Schemas().errors("evm_chain", devnet.doc) == []
    assert devnet.doc["wallet"] == address_of(WALLET_KEY)
    assert devnet.doc["chain_id"] == 31337
    assert sorted(devnet.doc["tokens"]) == sorted(amounts.tokens())
    assert sorted(devnet.doc["venues"]) == ["sushiswap", "uniswap_v2"]
    assert [p.name for p in path.parent.iterdir()] == ["devnet.json"]  # no temporary file left


def test_a_broken_chain_file_is_refused_with_the_field_named(devnet: DevnetHandle, tmp_path: Path) -> None:
    path = tmp_path / "devnet.json"
    broken = {**devnet.doc, "tokens": {**devnet.doc["tokens"], "SOL": {"address": "0x12", "decimals": 9}}}
    path.write_text(json.dumps(broken))
    with pytest.raises(EvmSetupError, match=r"tokens\.SOL\.address"):
        ChainFile.load(path)
    with pytest.raises(EvmSetupError, match="no chain file"):
        ChainFile.load(tmp_path / "missing.json")


def test_each_venue_quotes_sol_to_usdc_and_the_venues_differ(devnet: DevnetHandle) -> None:
    w3 = Web3(Web3.HTTPProvider(devnet.url))
    quotes = {venue: sol_to_usdc(w3, devnet.doc, venue, SOL) for venue in devnet.doc["venues"]}
    # About 220 USDC a SOL (less the 0.3% fee), sushiswap's SOL 0.5% dearer.
    for quote in quotes.values():
        assert 200 * 10**6 < quote < 240 * 10**6
    assert quotes["uniswap_v2"] != quotes["sushiswap"]


def test_a_larger_amount_gets_a_worse_price(devnet: DevnetHandle) -> None:
    w3 = Web3(Web3.HTTPProvider(devnet.url))
    for venue in devnet.doc["venues"]:
        small = sol_to_usdc(w3, devnet.doc, venue, SOL)
        large = sol_to_usdc(w3, devnet.doc, venue, 1000 * SOL)
        assert large < 1000 * small
    # The shallow venue's price falls faster: best for 1 SOL, not for 1,000.
    assert (sol_to_usdc(w3, devnet.doc, "sushiswap", 1000 * SOL)
            < sol_to_usdc(w3, devnet.doc, "uniswap_v2", 1000 * SOL))


def test_the_wallet_holds_every_token_with_the_file_s_decimals(devnet: DevnetHandle) -> None:
    w3 = Web3(Web3.HTTPProvider(devnet.url))
    abi, _ = load_artifact("ERC20DetailedMock")
    for symbol, token in devnet.doc["tokens"].items():
        contract = w3.eth.contract(address=token["address"], abi=abi)
        assert contract.functions.decimals().call() == token["decimals"] == amounts.tokens()[symbol].decimals
        assert contract.functions.symbol().call() == symbol
        assert contract.functions.balanceOf(devnet.doc["wallet"]).call() > 0


async def test_one_trader_step_moves_a_pool(devnet: DevnetHandle) -> None:
    # On the test's loop (pytest-tornasync): asyncio.run would unset the thread's loop.
    node = connect(devnet.url)
    try:
        trader = Trader(node, devnet.doc, rng=random.Random(7))
        await trader.approve_all()
        swap = await trader.step()
    finally:
        await node.provider.disconnect()
    assert swap is not None and swap.succeeded and swap.amount_in > 0
    w3 = Web3(Web3.HTTPProvider(devnet.url))
    block = w3.eth.get_transaction_receipt(swap.tx_hash)["blockNumber"]
    pair = w3.eth.contract(address=swap.pair, abi=load_artifact("UniswapV2Pair")[0])
    before = pair.functions.getReserves().call(block_identifier=block - 1)[:2]
    after = pair.functions.getReserves().call(block_identifier=block)[:2]
    token_in = Web3.to_checksum_address(devnet.doc["tokens"][swap.token_in]["address"])
    sold = 0 if pair.functions.token0().call() == token_in else 1
    assert after[sold] == before[sold] + swap.amount_in  # the pool got what was sold
    assert after[1 - sold] < before[1 - sold]  # and paid out the other token


def test_without_anvil_the_error_says_to_run_make_devnet_deps(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(devnet_module, "ANVIL_BIN", tmp_path / "no-anvil")
    with pytest.raises(DevnetError, match="run `make devnet-deps`"):
        Anvil(8545).start()


def test_a_port_in_use_is_refused(devnet: DevnetHandle) -> None:
    # The session's anvil holds its port; a second one there would fail to bind while
    # the first answered in its place.
    with pytest.raises(DevnetError, match=f"port {devnet.anvil.port} on 127.0.0.1 is in use"):
        Anvil(devnet.anvil.port).start()


class _BadFlagAnvil(Anvil):
    def command(self) -> list[str]:
        return [*super().command(), "--no-such-flag"]


def test_an_anvil_that_exits_is_reported_with_its_output() -> None:
    anvil = _BadFlagAnvil(free_port())
    with pytest.raises(DevnetError, match=r"anvil exited with code 2 .*--no-such-flag"):
        anvil.start()
    assert anvil.process is None  # stopped, its log closed
