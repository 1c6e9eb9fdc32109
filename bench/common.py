"""Generic helpers for the benchmarks: child processes with awaited output lines, Go peers, tables.

Bench scripts run from the repository (`python3 bench/<name>.py`); importing
this module puts the repository root on sys.path so `tun2g` and the test
suite's Go peer builder (tests/fixtures/gopeers.py) import without installing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.fixtures.gopeers import GoPeerUnavailable, PeerProcess, build_go_binary  # noqa: E402

MIB = 1024 * 1024

__all__ = ["MIB", "REPO_ROOT", "GoPeerUnavailable", "PeerProcess", "build_go_binary", "child_env",
           "format_table", "ratio", "start_go_peer", "start_python"]


BENCH_ADMIN_TOKEN = "bench-admin-token"  # no token file is written outside the bench's own processes


def child_env() -> dict:
    """The environment for child processes: repository importable, no HTTP proxies."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.setdefault("TUN2G_ADMIN_TOKEN", BENCH_ADMIN_TOKEN)  # servers take it; admin API calls send it
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def start_python(script: Path | str, *args) -> PeerProcess:
    """Run `python3 script args...` as a child whose stdout lines can be awaited."""
    return PeerProcess([sys.executable, str(script), *args], env=child_env())


def start_go_peer(name: str, *args) -> PeerProcess:
    """Build (cached) and run the Go peer tests/go/<name>."""
    return PeerProcess([build_go_binary(name), *args], env=child_env())


def ratio(value: float | None, base: float | None) -> str:
    """value/base as "0.42x", or "-" when either is missing."""
    if not value or not base:
        return "-"
    return f"{value / base:.2f}x"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table with aligned columns (first column left, the rest right)."""
    cells = [headers] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        parts = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(headers), rule] + [line(row) for row in cells[1:]])
