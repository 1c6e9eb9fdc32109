"""The README's Layout table names every module of the package, and only modules that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parent.parent


def _layout_rows() -> dict[str, set[str]]:
    """Folder -> module names its rows mention (backticked words)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, set[str]] = {}
    for line in section.splitlines():
        match = re.match(r"\| [a-z0-9 ]+ \| `(tun2g/[a-z_/]*)` \| (.*) \|$", line)
        if match:
            rows.setdefault(match.group(1), set()).update(re.findall(r"`([a-z_0-9]+)`", match.group(2)))
    return rows


def test_every_module_has_its_place_in_the_layout_table():
    rows = _layout_rows()
    assert rows, "no Layout table rows found in README.md"
    missing, unknown = [], []
    for folder, names in rows.items():
        directory = ROOT / folder
        present = {path.stem for path in directory.glob("*.py") if path.stem not in ("__init__", "__main__")}
        missing += [f"{folder}{name}.py" for name in sorted(present - names)]
        unknown += [f"{folder}{name}" for name in sorted(names - present)]
    packages = {f"tun2g/{path.parent.name}/" for path in (ROOT / "tun2g").glob("*/__init__.py")}
    missing += sorted(packages - set(rows))
    assert not missing, f"modules the README's Layout table does not name: {missing}"
    assert not unknown, f"the README's Layout table names modules that do not exist: {unknown}"
