"""One EVM chain as the EVM venues (engine.execution.venues.evm) share it: the node,
the wallet, the token registry, the wallet's nonces and its fees.

* The node is reached over standard JSON-RPC with web3.py's async API; transactions
  are signed locally with eth-account (EIP-1559 type-2, EIP-155 chain id).
* The chain file (``schemas/evm_chain.json``; the devnet writes one) names the
  tokens (symbol -> address, decimals) and the venues (name -> Uniswap V2 router and
  factory). A token's decimals must equal the API's (engine.core.amounts), since
  amounts are validated in those units: a mismatch stops the worker at start.
* Nonces. Several workers may share one wallet. The next free nonce is a Redis key
  (``keys.next_nonce``) that moves only inside the atomic step that records a
  transaction on its order (OrderStore.record_tx), and only by one: a nonce is
  taken by exactly one recorded transaction, which is then sent (or resent by
  whoever resumes its order), so no two transactions share a nonce and none is
  skipped. Within a process, building and recording are serialised by a lock, so
  orders in flight in one worker do not race for a nonce; across workers, the
  loser of a race builds again with the next one (``NONCE_TAKEN``).
* The private key stays in the eth-account ``LocalAccount``; it is never logged,
  put in an error, a metric or a status message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import aiohttp
import jsonschema
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import HexStr
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.exceptions import (
    ContractLogicError,
    ProviderConnectionError,
    TimeExhausted,
    TransactionNotFound,
    Web3Exception,
    Web3RPCError,
)

from engine.core import (
    amounts,
    keys,
    recursion,  # noqa: F401  - after web3: see the module
)
from engine.core.config import PROJECT_ROOT, Config
from engine.core.store import CLAIM_NONCE_LUA, RAISE_NONCE_FLOOR_LUA, Recorded
from engine.execution.venues.base import TransientVenueError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The npm packages' build artifacts (installed by `make devnet-deps`): the ABIs.
NODE_MODULES = PROJECT_ROOT / "devnet" / "node_modules"
CHAIN_SCHEMA = PROJECT_ROOT / "schemas" / "evm_chain.json"
# One JSON-RPC request may take this long before it counts as a transient failure.
RPC_TIMEOUT_SECS = 10.0
# Builds of one transaction while other workers keep taking the nonce it was built with.
NONCE_TRIES = 16
# ERC-20 allowance given to a router once (type(uint256).max), and the least one
# that counts as "already approved".
MAX_UINT256 = 2**256 - 1
ENOUGH_ALLOWANCE = 2**255
APPROVAL_RECEIPT_TIMEOUT_SECS = 120.0
# How often a worker reads the chain's head for /readyz, and how long that answer
# stands in Redis (keys.CHAIN_HEALTH) before it counts as stale.
CHAIN_HEALTH_EVERY_SECS = 2.0
CHAIN_HEALTH_TTL_SECS = 10
# The ledger of signed transactions is trimmed below the mined nonce every this many.
LEDGER_TRIM_EVERY = 100
# Fees are asked of the node at most this often.
FEES_MAX_AGE_SECS = 2.0

# What a JSON-RPC call can fail with that trying again may cure.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientError,
    TimeoutError,
    OSError,
    ProviderConnectionError,
    TimeExhausted,
)


# How nodes say eth_sendRawTransaction got a transaction they already have (geth,
# erigon and reth: "already known"; besu: "known transaction"; anvil: "already imported").
ALREADY_RECEIVED = ("already known", "known transaction", "already imported", "alreadyknown")


class EvmSetupError(RuntimeError):
    """The EVM market cannot start as configured (one clear line for the operator)."""


def load_abi(package: str, contract: str, names: Collection[str] = ()) -> list[dict[str, Any]]:
    """The ABI in ``@uniswap/<package>/build/<contract>.json`` (only the functions and
    events in ``names``, if given); EvmSetupError if the npm packages are not
    installed. web3 looks a function up by hashing the selector of every entry of
    the ABI on every call: a trimmed ABI made a quote ~40% cheaper in CPU."""
    path = NODE_MODULES / "@uniswap" / package / "build" / f"{contract}.json"
    try:
        abi: list[dict[str, Any]] = json.loads(path.read_text())["abi"]
    except FileNotFoundError:
        raise EvmSetupError(f"{path} is missing: run `make devnet-deps` (needs npm)") from None
    if names:
        abi = [entry for entry in abi if entry.get("name") in names]
        missing = set(names) - {entry["name"] for entry in abi}
        if missing:
            raise EvmSetupError(f"{path} has no {', '.join(sorted(missing))}")
    return abi


@dataclasses.dataclass(frozen=True)
class ChainToken:
    symbol: str
    address: str  # checksummed
    decimals: int


@dataclasses.dataclass(frozen=True)
class ChainFile:
    """The chain file (schemas/evm_chain.json), checked."""

    chain_id: int
    rpc_url: str
    tokens: Mapping[str, ChainToken]
    venues: Mapping[str, tuple[str, str]]  # name -> (router, factory), checksummed

    @classmethod
    def load(cls, path: Path) -> ChainFile:
        """Read and validate ``path``; EvmSetupError saying what is wrong."""
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise EvmSetupError(
                f"no chain file at {path}: set EVM_CHAIN_FILE, or unset EVM_RPC_URL to start the devnet"
            ) from None
        except ValueError as exc:
            raise EvmSetupError(f"chain file {path} is not JSON: {exc}") from None
        return cls.from_doc(doc, str(path))

    @classmethod
    def from_doc(cls, doc: Any, path: str = "the chain file") -> ChainFile:
        """Validate a chain file's document; EvmSetupError saying what is wrong."""
        validator = jsonschema.Draft202012Validator(json.loads(CHAIN_SCHEMA.read_bytes()))
        problems = [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                    for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]
        if problems:
            raise EvmSetupError(f"{path} breaks schemas/evm_chain.json: " + "; ".join(problems))
        tokens = {}
        for symbol, entry in doc["tokens"].items():
            try:
                api_decimals = amounts.token(symbol).decimals
            except amounts.AmountError:
                continue  # a token the API does not trade
            if entry["decimals"] != api_decimals:
                raise EvmSetupError(
                    f"{path}: {symbol} has {entry['decimals']} decimals on chain, "
                    f"the API uses {api_decimals}"
                )
            address = AsyncWeb3.to_checksum_address(entry["address"])
            tokens[symbol] = ChainToken(symbol, address, entry["decimals"])
        venues = {
            name: (AsyncWeb3.to_checksum_address(v["router"]), AsyncWeb3.to_checksum_address(v["factory"]))
            for name, v in doc["venues"].items()
        }
        return cls(doc["chain_id"], doc["rpc_url"], tokens, venues)


def load_wallet(config: Config) -> LocalAccount:
    """The service's account, from EVM_PRIVATE_KEY or EVM_KEYSTORE (a V3 keystore
    JSON) + EVM_KEYSTORE_PASSWORD; EvmSetupError otherwise (never showing the key)."""
    if config.evm_private_key:
        try:
            account: LocalAccount = Account.from_key(config.evm_private_key)
        except ValueError:  # e.g. zero, or past the curve's order (never shown)
            raise EvmSetupError("EVM_PRIVATE_KEY is not a valid secp256k1 private key") from None
        return account
    if config.evm_keystore is not None:
        if config.evm_keystore_password is None:
            raise EvmSetupError("EVM_KEYSTORE is set but EVM_KEYSTORE_PASSWORD is not")
        try:
            key = Account.decrypt(json.loads(config.evm_keystore.read_text()), config.evm_keystore_password)
        except (OSError, ValueError) as exc:
            raise EvmSetupError(f"cannot open keystore {config.evm_keystore}: {type(exc).__name__}") from None
        account = Account.from_key(key)
        return account
    raise EvmSetupError("MARKET=evm needs EVM_PRIVATE_KEY, or EVM_KEYSTORE and EVM_KEYSTORE_PASSWORD")


def connect_node(rpc_url: str) -> AsyncWeb3[Any]:
    """An async web3 on ``rpc_url``. web3's own retries are off: a retry is this
    service's decision (a resent eth_sendRawTransaction is harmless, others are not
    always), and every call times out after RPC_TIMEOUT_SECS.

    Without web3's default middleware: its request validation asks the node for
    eth_chainId before every eth_call (the chain id is checked once at start and
    signed into every transaction instead), and the ENS, gas-price and gas-estimate
    ones serve calls this service does not make. Measured: a quote took 17 ms of
    CPU with them (python -m bench.evm, docs/benchmarks.md)."""
    provider = AsyncHTTPProvider(
        rpc_url,
        request_kwargs={"timeout": aiohttp.ClientTimeout(total=RPC_TIMEOUT_SECS)},
        exception_retry_configuration=None,
    )
    w3 = AsyncWeb3(provider)
    w3.middleware_onion.clear()
    return w3


async def rpc(what: str, call: Awaitable[T]) -> T:
    """Await a JSON-RPC call; a transport failure or a node error becomes
    TransientVenueError (contract reverts, TransactionNotFound and the like pass)."""
    try:
        return await call
    except TRANSPORT_ERRORS as exc:
        raise TransientVenueError(f"{what}: {type(exc).__name__}: {exc}") from None
    except (TransactionNotFound, ContractLogicError):  # answers, not failures
        raise
    except Web3Exception as exc:
        # Web3RPCError (the node refused or failed), BadFunctionCallOutput (no code
        # at the address: e.g. a node behind), BlockNotFound after a reorg, a reply
        # that is not JSON-RPC: the caller retries, and an operator reads the log.
        raise TransientVenueError(f"{what}: {type(exc).__name__}: {exc}") from None


class EvmChain:
    """The node, the wallet and its nonces, shared by every EVM venue of a worker."""

    def __init__(
        self,
        w3: AsyncWeb3[Any],
        account: LocalAccount,
        chain: ChainFile,
        redis: Redis,
        *,
        confirmations: int = 1,
        max_fee_wei: int = 500 * 10**9,
        deadline_secs: int = 600,
    ) -> None:
        self.w3 = w3
        self.account = account
        self.chain = chain
        self.confirmations = confirmations
        self.max_fee_wei = max_fee_wei
        self.deadline_secs = deadline_secs
        self.genesis: str | None = None  # the chain's block 0 hash, once check()ed
        self.nonce_lock = asyncio.Lock()
        self.redis = redis
        self._claim_script = redis.register_script(CLAIM_NONCE_LUA)
        self._floor_script = redis.register_script(RAISE_NONCE_FLOOR_LUA)
        self._next: int | None = None  # this process's view of the next free nonce
        self._fees: tuple[float, int, int] | None = None  # (monotonic time, max fee, tip)
        self._watching = False
        self._erc20_abi = load_abi("v2-core", "IERC20", ("allowance", "approve"))

    @classmethod
    def from_config(cls, config: Config, redis: Redis) -> EvmChain:
        """The chain of ``config``: its chain file, wallet and node (EVM_RPC_URL, else
        the chain file's rpc_url)."""
        chain = ChainFile.load(config.chain_file)
        w3 = connect_node(config.evm_rpc_url or chain.rpc_url)
        return cls(
            w3,
            load_wallet(config),
            chain,
            redis,
            confirmations=config.confirmations,
            max_fee_wei=int(config.evm_max_fee_gwei * 10**9),
            deadline_secs=config.evm_deadline_secs,
        )

    @property
    def address(self) -> str:
        """The wallet's address (checksummed)."""
        return str(self.account.address)

    async def check(self) -> None:
        """EvmSetupError unless the node serves the chain file's chain; then learn
        the chain's genesis block hash, which names it in Redis (``nonce_key``): a
        local devnet started afresh has the same chain id but a new genesis, and
        must not inherit the nonces (or the approvals) of the last one."""
        chain_id = await rpc("eth_chainId", self.w3.eth.chain_id)
        if chain_id != self.chain.chain_id:
            raise EvmSetupError(f"the node serves chain {chain_id}, the chain file is for {self.chain.chain_id}")
        genesis = await rpc("eth_getBlockByNumber", self.w3.eth.get_block(0))
        self.genesis = genesis["hash"].to_0x_hex()

    async def start(self) -> None:
        """Ready the chain for a worker: ``check``, ``check_durability``, then
        ``reconcile``. EvmSetupError, or TransientVenueError."""
        await self.check()
        await self.check_durability()
        await self.reconcile()

    async def check_durability(self) -> None:
        """EvmSetupError unless Redis writes every command to its AOF before it
        answers (``appendonly yes``, ``appendfsync always``). A transaction is
        recorded before it is broadcast so that it is never signed twice; a Redis
        that loses its last second of writes after a crash would lose the record of
        a transaction already out, and the order's next driver would sign and send
        a second swap. A Redis that refuses CONFIG (some managed ones) is trusted,
        with a warning."""
        try:
            settings = cast(dict[str, str], await self.redis.config_get("append*"))
        except ResponseError:
            logger.warning("cannot read Redis's CONFIG: make sure it runs with appendonly yes and "
                           "appendfsync always, or a crash could make an order execute twice")
            return
        if settings.get("appendonly") != "yes" or settings.get("appendfsync") != "always":
            raise EvmSetupError(
                "MARKET=evm needs Redis with appendonly yes and appendfsync always (it has appendonly "
                f"{settings.get('appendonly')}, appendfsync {settings.get('appendfsync')}): a recorded "
                "transaction lost with Redis's last second of writes would be signed again"
            )

    @property
    def chain_ref(self) -> str:
        """The chain in Redis keys: ``<chain id>:<first 16 hex digits of its genesis hash>``."""
        if self.genesis is None:
            raise RuntimeError("EvmChain.check() must run first")
        return f"{self.chain.chain_id}:{self.genesis[2:18]}"

    @property
    def nonce_key(self) -> str:
        """The Redis key of the wallet's next free nonce on this chain."""
        return keys.next_nonce(self.chain_ref, self.address)

    @property
    def ledger_key(self) -> str:
        """The Redis key of the wallet's signed transactions by nonce on this chain."""
        return keys.wallet_txs(self.chain_ref, self.address)

    async def next_nonce(self) -> int:
        """The wallet's next free nonce: this process's view, else the Redis key
        raised to the node's pending transaction count (eth_getTransactionCount
        "pending": nonces used outside this service are skipped, never reused)."""
        if self._next is None:
            pending = await rpc(
                "eth_getTransactionCount", self.w3.eth.get_transaction_count(self.account.address, "pending")
            )
            self._next = int(await self._floor_script(keys=[self.nonce_key], args=[pending]))
        return self._next

    def forget_nonce(self) -> None:
        """Read the next free nonce from Redis and the node again next time."""
        self._next = None

    async def fees(self, *, fresh: bool = False) -> tuple[int, int]:
        """EIP-1559 (maxFeePerGas, maxPriorityFeePerGas) in wei: twice the latest base
        fee plus the node's suggested tip, capped at EVM_MAX_FEE_GWEI. Asked of the
        node at most every FEES_MAX_AGE_SECS (twice the base fee covers its rise of
        at most 12.5% a block, EIP-1559, for several blocks); ``fresh``: ask now."""
        now = time.monotonic()
        if fresh or self._fees is None or now - self._fees[0] > FEES_MAX_AGE_SECS:
            block, tip = await asyncio.gather(
                rpc("eth_getBlockByNumber", self.w3.eth.get_block("latest")),
                rpc("eth_maxPriorityFeePerGas", self.w3.eth.max_priority_fee),
            )
            max_fee = min(2 * int(block.get("baseFeePerGas", 0)) + int(tip), self.max_fee_wei)
            self._fees = (now, max_fee, min(int(tip), max_fee))
        return self._fees[1], self._fees[2]

    def transaction(
        self, to: str, data: str, gas: int, max_fee: int, tip: int, nonce: int | None = None
    ) -> dict[str, Any]:
        """The fields of an EIP-1559 (type 2) transaction on this chain, value 0
        (``nonce`` left to ``sign_and_record`` when None); fees in wei."""
        fields: dict[str, Any] = {
            "type": 2, "chainId": self.chain.chain_id, "to": to, "value": 0, "data": data, "gas": gas,
            "maxFeePerGas": max_fee, "maxPriorityFeePerGas": tip,
        }
        if nonce is not None:
            fields["nonce"] = nonce
        return fields

    def sign(self, fields: Mapping[str, Any]) -> tuple[str, str]:
        """Sign a transaction: its (tx_hash, raw) as 0x-hex (the hash is keccak256 of
        the EIP-2718 encoding, as the chain will name it)."""
        signed = self.account.sign_transaction(dict(fields))
        return signed.hash.to_0x_hex(), signed.raw_transaction.to_0x_hex()

    async def sign_and_record(
        self,
        fields: Mapping[str, Any],
        record: Callable[[int, str, str], Awaitable[Recorded]],
    ) -> tuple[int, str, str] | None:
        """Sign ``fields`` with the next free nonce and ``record(nonce, tx_hash, raw)``,
        under the nonce lock; again with the next nonce while another worker took it.
        The recorded (nonce, tx_hash, raw); None if ``record`` answered NOT_BUILDING."""
        async with self.nonce_lock:
            for _ in range(NONCE_TRIES):
                nonce = await self.next_nonce()
                tx_hash, raw = self.sign({**fields, "nonce": nonce})
                outcome = await record(nonce, tx_hash, raw)
                if outcome is Recorded.RECORDED:
                    self._next = nonce + 1
                    if nonce % LEDGER_TRIM_EVERY == 0:
                        await self._trim_ledger()
                    return nonce, tx_hash, raw
                if outcome is Recorded.NOT_BUILDING:
                    return None
                self.forget_nonce()
        raise TransientVenueError(f"no free nonce for {self.address} after {NONCE_TRIES} tries")

    async def watch_health(self) -> None:
        """Until cancelled: every CHAIN_HEALTH_EVERY_SECS, read the chain's head and
        write it to ``keys.CHAIN_HEALTH`` (expiring after CHAIN_HEALTH_TTL_SECS), so
        that the web's /readyz can say whether the node answers and moves."""
        if self._watching:
            return
        self._watching = True
        while True:
            try:
                head = await rpc("eth_getBlockByNumber", self.w3.eth.get_block("latest"))
                state = json.dumps({"block": int(head["number"]), "at": time.time(),
                                    "block_time": int(head["timestamp"]), "chain_id": self.chain.chain_id})
                await self.redis.set(keys.CHAIN_HEALTH, state, ex=CHAIN_HEALTH_TTL_SECS)
            except TransientVenueError as exc:
                logger.warning("the node does not answer: %s", exc)
            except Exception as exc:  # Redis down: the consumer says so; keep watching
                logger.debug("chain health not written: %r", exc)
            await asyncio.sleep(CHAIN_HEALTH_EVERY_SECS)

    async def _trim_ledger(self) -> None:
        """Forget the ledger's transactions below the wallet's nonce as of the block
        CONFIRMATIONS deep (a reorg may yet drop the ones above). Best effort: a
        failure is logged and the ledger trimmed next time."""
        try:
            head = await rpc("eth_blockNumber", self.w3.eth.block_number)
            deep = max(0, head - self.confirmations)
            mined = await rpc("eth_getTransactionCount", self.w3.eth.get_transaction_count(self.account.address, deep))
            await self.redis.zremrangebyscore(self.ledger_key, "-inf", f"({mined}")
        except Exception as exc:  # noqa: BLE001 - the RPC or Redis: try again later
            logger.warning("the ledger of %s was not trimmed: %r", self.address, exc)

    async def reconcile(self) -> list[int]:
        """Close the wallet's nonce gaps, before anything new is signed: every nonce
        Redis has given out (below its next free one) that the node does not count
        (``eth_getTransactionCount`` "pending") is a transaction recorded and then
        not broadcast, or lost from the node. Its signed bytes from the ledger are
        sent again; a nonce with none there (its record lost) gets a zero-value
        transfer to the wallet itself, so that later transactions are not stuck
        behind it. Trims the ledger below the mined nonce. The nonces filled with a
        transfer, in order."""
        eth = self.w3.eth
        await self._trim_ledger()
        pending = await rpc("eth_getTransactionCount", eth.get_transaction_count(self.account.address, "pending"))
        free = int(await self._floor_script(keys=[self.nonce_key], args=[pending]))
        filled: list[int] = []
        for nonce in range(pending, free):
            recorded = cast(list[str], await self.redis.zrangebyscore(self.ledger_key, nonce, nonce))
            if recorded:
                # One, unless a replacement was recorded too: the node keeps the one
                # it takes (refusing an underpriced one is fine: an order's driver
                # replaces its own transaction when it resumes).
                for raw in recorded:
                    try:
                        await self._broadcast(raw, f"recorded transaction (nonce {nonce})")
                    except TransientVenueError as exc:
                        logger.warning("nonce %s: %s", nonce, exc)
                logger.warning("nonce %s: sent the recorded transaction again (a worker stopped before it)", nonce)
                continue
            max_fee, tip = await self.fees()
            _tx_hash, raw = self.sign(self.transaction(self.address, "0x", 21_000, max_fee, tip, nonce))
            await self.redis.zadd(self.ledger_key, {raw: nonce})
            try:
                await self._broadcast(raw, f"gap filler (nonce {nonce})")
            except TransientVenueError as exc:  # e.g. another worker's filler got there first
                logger.warning("nonce %s: %s", nonce, exc)
            logger.warning("nonce %s: taken but its transaction is lost; filled with a zero-value transfer", nonce)
            filled.append(nonce)
        self.forget_nonce()
        return filled

    async def ensure_allowance(self, token: ChainToken, spender: str) -> None:
        """Approve ``spender`` (a router) for all of ``token`` (ERC-20 ``approve``),
        unless it already may spend at least 2**255 base units: once per token and
        router, not per order. Waits for the approval's receipt.

        The approval takes its nonce by the same rule as a swap, its signed bytes
        recorded in the wallet's ledger in the same step; a worker that starts sends
        what a worker that died did not (``reconcile``), so its nonce is not left
        unused."""
        erc20 = self.w3.eth.contract(address=AsyncWeb3.to_checksum_address(token.address), abi=self._erc20_abi)
        allowance = await rpc("allowance", erc20.functions.allowance(self.address, spender).call())
        if allowance >= ENOUGH_ALLOWANCE:
            return
        approve = erc20.functions.approve(spender, MAX_UINT256)
        gas = await rpc("eth_estimateGas", approve.estimate_gas({"from": self.address}))
        max_fee, tip = await self.fees()
        fields = self.transaction(erc20.address, erc20.encode_abi("approve", args=[spender, MAX_UINT256]),
                                  gas * 12 // 10, max_fee, tip)

        async def claim(nonce: int, _tx_hash: str, raw: str) -> Recorded:
            outcome = await self._claim_script(keys=[self.nonce_key, self.nonce_key, self.ledger_key],
                                               args=["", "", nonce, raw])
            return Recorded(int(outcome))

        signed = await self.sign_and_record(fields, claim)
        assert signed is not None, "claiming a nonce never answers NOT_BUILDING"
        nonce, tx_hash, raw = signed
        await self._broadcast_and_wait(raw, f"approval of {spender} for {token.symbol}")
        logger.info("approved router %s for %s (tx %s, nonce %s)", spender, token.symbol, tx_hash, nonce)

    async def _broadcast(self, raw: str, what: str) -> str:
        """Send a signed transaction (again: a node that has it already, or has mined
        it, is fine); its hash."""
        tx_hash = AsyncWeb3.keccak(hexstr=HexStr(raw)).to_0x_hex()
        try:
            await self.w3.eth.send_raw_transaction(HexStr(raw))
        except TRANSPORT_ERRORS as exc:
            raise TransientVenueError(f"{what}: eth_sendRawTransaction: {exc!r}") from None
        except Web3RPCError as exc:
            if not any(answer in str(exc).lower() for answer in ALREADY_RECEIVED + ("nonce too low",)):
                raise TransientVenueError(f"{what}: eth_sendRawTransaction: {exc}") from None
        return tx_hash

    async def _broadcast_and_wait(self, raw: str, what: str) -> None:
        """``_broadcast``, then wait for the receipt; EvmSetupError if it reverted."""
        tx_hash = await self._broadcast(raw, what)
        receipt = await rpc(
            "receipt", self.w3.eth.wait_for_transaction_receipt(HexStr(tx_hash), APPROVAL_RECEIPT_TIMEOUT_SECS)
        )
        if receipt["status"] != 1:
            raise EvmSetupError(f"{what} reverted ({tx_hash})")
