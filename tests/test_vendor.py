"""Vendored front-end libraries: exactly what scripts/vendor.py took from the npm registry."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

VENDOR = Path(__file__).resolve().parent.parent / "static" / "vendor"
SUMS = [line.split("  ", 1) for line in (VENDOR / "SHA256SUMS").read_text().splitlines() if not line.startswith("#")]


@pytest.mark.parametrize(("digest", "name"), SUMS, ids=[name for _, name in SUMS])
def test_every_vendored_file_matches_its_checksum(digest: str, name: str) -> None:
    assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, f"{name} was edited"


def test_nothing_unlisted_sits_in_the_vendor_folder() -> None:
    present = {str(p.relative_to(VENDOR)) for p in VENDOR.rglob("*") if p.is_file()} - {"SHA256SUMS"}

    assert present == {name for _, name in SUMS}


def test_each_library_keeps_its_license_and_pins_its_version_in_the_file_name() -> None:
    pinned = re.findall(r"^# (\S+)@(\S+)$", (VENDOR / "SHA256SUMS").read_text(), re.M)
    licenses = {name for _, name in SUMS if name.startswith("licenses/")}

    assert {package for package, _ in pinned} == {"markdown-it", "dompurify", "@highlightjs/cdn-assets", "katex"}
    for _package, version in pinned:
        assert any(version in name for name in licenses), f"no license for version {version}"
        assert any(version in name for _, name in SUMS if not name.startswith("licenses/"))


def test_the_page_loads_the_vendored_versions() -> None:
    static = VENDOR.parent
    sources = "\n".join(p.read_text() for p in [*static.glob("*.html"), *static.glob("js/*.js")])

    for _, name in SUMS:
        if name.endswith(".js"):
            assert f"vendor/{name}" in sources, f"{name} is vendored but not used"


def test_every_woff2_font_the_katex_stylesheet_asks_for_is_vendored_beside_it() -> None:
    [stylesheet] = VENDOR.glob("katex-*/katex.min.css")
    fonts = set(re.findall(r"url\((fonts/[^)]+\.woff2)\)", stylesheet.read_text()))

    assert len(fonts) == 20
    assert all((stylesheet.parent / font).is_file() for font in fonts)


def test_the_page_loads_the_vendored_stylesheets() -> None:
    html = (VENDOR.parent / "index.html").read_text()

    for _, name in SUMS:
        if name.endswith(".css"):
            assert f"static/vendor/{name}" in html, f"{name} is vendored but not used"
