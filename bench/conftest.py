"""Benchmark session helpers: every benchmark records a row; rows are written as JSON at exit.

Run with `make bench` (or `pytest bench -m bench`). Figures are ratios against a baseline
measured in the same run, never absolute timing assertions.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest
import torch

from heron.profiling.environment import environment as heron_environment

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

RESULTS_DIR = Path(__file__).parent / "results"
_ROWS: dict[str, list[dict]] = {}


@pytest.fixture
def record():
    """record(table, **row): add a row to bench/results/<table>.json."""

    def add(table: str, **row) -> None:
        _ROWS.setdefault(table, []).append(row)

    return add


def pytest_sessionfinish(session, exitstatus):
    if not _ROWS:
        return
    RESULTS_DIR.mkdir(exist_ok=True)
    # threads and the allocator (LD_PRELOAD=libjemalloc.so.2 to run under jemalloc) come with it
    environment = {**heron_environment(), "cpu": platform.processor() or platform.machine()}
    suffix = "cuda" if torch.cuda.is_available() else "cpu"
    for table, rows in _ROWS.items():
        path = RESULTS_DIR / f"{table}_{suffix}.json"
        path.write_text(json.dumps({"environment": environment, "rows": rows}, indent=2) + "\n")
