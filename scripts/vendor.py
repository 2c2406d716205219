#!/usr/bin/env python3
"""Refresh ``static/vendor/`` from the npm registry's own distributions.

The page uses markdown-it, DOMPurify, highlight.js and KaTeX exactly as their
authors publish them: this script fetches each pinned version with
``npm pack``, checks the tarball against the registry's ``dist.integrity``,
copies the distribution files (renamed only, so their version shows in the
name or folder; never edited), copies each license, and writes ``SHA256SUMS``,
which a test checks so that a hand edit cannot go unnoticed.

To upgrade, change a version below, run ``python scripts/vendor.py``, update
the file names in ``static/`` that import them, and commit the result.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

logger = logging.getLogger("vendor")

VENDOR = Path(__file__).resolve().parent.parent / "static" / "vendor"


@dataclass(frozen=True)
class Package:
    """A pinned npm package and the files taken from it (path in the tarball → vendored name).

    A path with a wildcard takes every file that matches it into the folder it maps to.
    """

    name: str
    version: str
    files: dict[str, str]
    licenses: tuple[str, ...] = ("LICENSE",)
    slug: str = field(default="")

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"


PACKAGES = (
    Package(
        "markdown-it",
        "15.0.3",
        {"dist/browser/markdown-it.esm.min.mjs": "markdown-it-15.0.3.min.js"},
        slug="markdown-it",
    ),
    Package(
        "dompurify",
        "3.4.18",
        {"dist/purify.es.mjs": "purify-3.4.18.es.js"},
        licenses=("LICENSE",),
        slug="dompurify",
    ),
    # highlight.js's own prebuilt browser distribution (the `highlight.js` package ships sources only).
    Package(
        "@highlightjs/cdn-assets",
        "11.12.0",
        {
            "es/highlight.min.js": "highlight-11.12.0.min.js",
            "styles/github.min.css": "highlight-11.12.0-github.min.css",
            "styles/github-dark.min.css": "highlight-11.12.0-github-dark.min.css",
        },
        slug="highlight.js",
    ),
    # KaTeX's own ES module, and its stylesheet with the fonts beside it where the stylesheet looks for them
    # (fonts/ next to it). Only the woff2 fonts: every browser the page supports reads woff2, and the
    # stylesheet lists woff2 first.
    Package(
        "katex",
        "0.19.1",
        {
            "dist/katex.mjs": "katex-0.19.1/katex.es.js",
            "dist/katex.min.css": "katex-0.19.1/katex.min.css",
            "dist/fonts/*.woff2": "katex-0.19.1/fonts/",
        },
        slug="katex",
    ),
)


def npm(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["npm", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def fetch(package: Package, workdir: Path) -> Path:
    """Download the tarball and verify it against the registry's integrity hash."""
    integrity = json.loads(npm("view", package.spec, "dist.integrity", "--json"))
    packed = json.loads(npm("pack", package.spec, "--json", "--pack-destination", str(workdir)))
    tarball = workdir / packed[0]["filename"]
    algorithm, _, expected = integrity.partition("-")
    digest = base64.b64encode(hashlib.new(algorithm, tarball.read_bytes()).digest()).decode()
    if digest != expected:
        raise SystemExit(f"{package.spec}: tarball does not match the registry's {algorithm} integrity")
    return tarball


def members(package: Package, archive: tarfile.TarFile) -> list[tuple[str, str]]:
    """(path in the tarball, vendored name) for every file the package's list names or matches."""
    pairs = []
    for pattern, name in package.files.items():
        if "*" not in pattern:
            pairs.append((pattern, name))
            continue
        matched = [m.name.removeprefix("package/") for m in archive.getmembers() if m.isfile()]
        matched = sorted(path for path in matched if fnmatch(path, pattern))
        if not matched:
            raise SystemExit(f"{package.spec}: no file matches {pattern}")
        pairs += [(path, name + path.rsplit("/", 1)[-1]) for path in matched]
    return pairs


def extract(package: Package, tarball: Path) -> list[str]:
    written = []
    with tarfile.open(tarball) as archive:
        for member, name in members(package, archive):
            source = archive.extractfile(f"package/{member}")
            if source is None:
                raise SystemExit(f"{package.spec}: no file {member}")
            (VENDOR / name).parent.mkdir(parents=True, exist_ok=True)
            (VENDOR / name).write_bytes(source.read())
            written.append(name)
        for license_name in package.licenses:
            source = archive.extractfile(f"package/{license_name}")
            if source is None:
                raise SystemExit(f"{package.spec}: no {license_name}")
            name = f"licenses/{package.slug}-{package.version}-{license_name}.txt"
            (VENDOR / name).write_bytes(source.read())
            written.append(name)
    return written


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if VENDOR.exists():
        shutil.rmtree(VENDOR)
    (VENDOR / "licenses").mkdir(parents=True)
    written: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for package in PACKAGES:
            logger.info("fetching %s", package.spec)
            written += extract(package, fetch(package, Path(tmp)))
    lines = [f"{hashlib.sha256((VENDOR / name).read_bytes()).hexdigest()}  {name}" for name in sorted(written)]
    header = ["# Vendored from the npm registry by scripts/vendor.py; do not edit these files."]
    header += [f"# {p.spec}" for p in PACKAGES]
    (VENDOR / "SHA256SUMS").write_text("\n".join(header + lines) + "\n")
    logger.info("wrote %d files to %s", len(written), VENDOR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
