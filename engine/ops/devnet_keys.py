"""The local devnet's accounts: anvil's published dev keys (from the mnemonic "test
test test test test test test test test test test junk", accounts 0-3).

Public test keys, for a local chain only: never fund them anywhere else. Kept apart
from engine.ops.devnet so that server.py can hand the wallet's key to the worker it
starts without importing web3.
"""

DEPLOYER_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
WALLET_KEY = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"  # the service
TRADER_KEY = "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a"  # background trader
OTHER_KEY = "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6"  # tests' counterparty
