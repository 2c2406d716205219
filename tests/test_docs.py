"""The README and ``--help`` document every setting, and CI runs the README's test command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from handlers.config import settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SETTINGS = list(settings())


def _names(setting: object) -> list[str]:
    meta = setting.metadata  # type: ignore[attr-defined]
    return [*meta["env"], *([meta["flag"]] if meta["flag"] else [])]


@pytest.mark.parametrize("setting", SETTINGS, ids=[s.name for s in SETTINGS])
def test_readme_documents_every_setting(setting: object) -> None:
    for name in _names(setting):
        assert f"`{name}`" in README, f"README does not mention {name}"


def test_help_documents_every_setting() -> None:
    result = subprocess.run(
        [sys.executable, "server.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    text = " ".join(result.stdout.split())

    for setting in SETTINGS:
        for name in _names(setting):
            assert name in text, f"--help does not mention {name}"


def test_readme_lists_every_error_code_the_code_can_produce() -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "handlers").rglob("*.py"))
    codes = set(re.findall(r'code ?= ?"([a-z_]+)"', source)) | set(re.findall(r'\("(upstream_[a-z_]+)", ', source))

    missing = sorted(code for code in codes if f"`{code}`" not in README)
    assert not missing, f"README's error table lacks {missing}"


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line and not line.startswith("#"))

    assert f"\n{command}\n" in README
