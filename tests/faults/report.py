"""The figures the fault and fuzz tests measure, gathered in one JSON file per run.

The file is ``$RELIABILITY_REPORT`` if set, else ``reliability.json`` in pytest's
base temporary folder; its path is printed at the end of the run. docs/reliability.md
is filled from it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import pytest

from tests.faults import SOAK

REPORT_ENV = "RELIABILITY_REPORT"


class Figures:
    """Records one dict of figures per test; each record rewrites the file, which a
    run starts afresh."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            "run": {
                "mode": "soak" if SOAK else "default",
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            }
        }

    def record(self, test: str, figures: dict[str, Any]) -> None:
        self.data[test] = figures
        self.path.write_text(json.dumps(self.data, indent=2, sort_keys=True) + "\n")
        # Shown with -s, or with the test's output when it fails.
        print(f"{test}: {json.dumps(figures, sort_keys=True)}")


# One Figures per run, shared by the test modules that record.
_RUN: dict[str, Figures] = {}


def figures_fixture(request: pytest.FixtureRequest, factory: pytest.TempPathFactory) -> Figures:
    """The run's Figures (session fixtures in test_faults.py and test_fuzz.py call this)."""
    if "figures" in _RUN:
        return _RUN["figures"]
    path = Path(os.environ.get(REPORT_ENV) or factory.getbasetemp() / "reliability.json")
    figures = _RUN["figures"] = Figures(path)

    def announce() -> None:
        _RUN.pop("figures", None)
        if path.exists():
            reporter = request.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.write_line(f"reliability figures: {path}")

    # After the session, when output is no longer captured.
    request.config.add_cleanup(announce)
    return figures
