"""Undo an import-time side effect of py_ecc, which web3.py and eth-account import.

``py_ecc/__init__.py`` raises the interpreter's recursion limit to 100,000 for every
module of the process. With it, a runaway recursion (a deeply nested JSON document
among them: ``tests/test_orders_api.py`` sends 5,000 levels) overflows the C stack
and kills the process instead of raising RecursionError. Every module of this
service that imports web3 or eth-account imports this one after them, which puts
the limit back to CPython's default; the service uses no py_ecc code that needs it.
"""

from __future__ import annotations

import sys

import py_ecc  # noqa: F401  - run its import (and its side effect) now, then undo it

# CPython's default (sys.getrecursionlimit() in a fresh interpreter).
DEFAULT_RECURSION_LIMIT = 1000

sys.setrecursionlimit(DEFAULT_RECURSION_LIMIT)
