"""The README's Layout section names paths that exist, and every package of python/heron is in it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layout_section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("## Layout\n"):readme.index("\n## ", readme.index("## Layout\n") + 1)]


def test_layout_paths_exist():
    paths = [p for p in re.findall(r"`([\w./-]+/[\w./-]*)`", layout_section())]
    assert paths
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert missing == []


def test_every_package_is_in_the_layout():
    section = layout_section()
    packages = [p.parent.relative_to(ROOT).as_posix() + "/" for p in (ROOT / "python").glob("*/*/__init__.py")]
    packages += [p.parent.relative_to(ROOT).as_posix() + "/" for p in (ROOT / "python").glob("*/__init__.py")]
    assert [p for p in packages if f"`{p}" not in section] == []
