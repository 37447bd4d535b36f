"""The folders are the roles: the web process never imports the worker's code, and
the worker's code never imports the web's (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

from engine.core.config import PROJECT_ROOT


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def imports_under(folder: str) -> dict[str, set[str]]:
    return {str(path.relative_to(PROJECT_ROOT)): imported_modules(path)
            for path in sorted((PROJECT_ROOT / folder).rglob("*.py"))}


def test_the_web_process_never_imports_the_worker_s_code() -> None:
    web_side = {**imports_under("handlers"), **imports_under("engine/web"),
                "server.py": imported_modules(PROJECT_ROOT / "server.py")}
    crossing = {f: sorted(m for m in mods if m.startswith("engine.execution")) for f, mods in web_side.items()}
    assert {f: m for f, m in crossing.items() if m} == {}


def test_the_worker_s_code_never_imports_the_web_s() -> None:
    worker_side = {**imports_under("engine/execution"), "worker.py": imported_modules(PROJECT_ROOT / "worker.py")}
    crossing = {f: sorted(m for m in mods if m.startswith(("engine.web", "handlers")))
                for f, mods in worker_side.items()}
    assert {f: m for f, m in crossing.items() if m} == {}


def test_core_imports_neither_side() -> None:
    core = imports_under("engine/core")
    crossing = {f: sorted(m for m in mods if m.startswith(("engine.web", "engine.execution", "handlers")))
                for f, mods in core.items()}
    assert {f: m for f, m in crossing.items() if m} == {}


def test_only_the_composition_root_names_a_market() -> None:
    # The consumer, the driver and the router know venues only by their contract.
    execution = imports_under("engine/execution")
    naming = sorted(f for f, mods in execution.items()
                    if any(m.startswith(("engine.execution.venues.simulated", "engine.execution.venues.market",
                                        "engine.execution.venues.evm"))
                           for m in mods) and "/venues/" not in f)
    assert naming == ["engine/execution/services.py"]
