"""`dvc plots show` without a network: an HTML page template with Vega, Vega-Lite and vega-embed inlined, and
DVC's plots.html_template pointing at it.

    python -m duel.offline_plots        (make setup; run in the project root, needs npm)

DVC's own page loads the three libraries from a CDN (dvc_render.vega.VegaRenderer.SCRIPTS), so offline it is blank.
This template is that page with its {scripts} placeholder replaced by the libraries themselves: DVC then has nowhere
to put the CDN tags. The libraries come from the npm registry (`npm pack`), checked against the sha512 pinned here.
Writes .cache/offline_plots.html (ignored by git) and plots.html_template in .dvc/config; a template that already
holds these versions is kept, so a second run downloads nothing.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import tarfile
import tempfile
from pathlib import Path

from dvc.config import Config
from dvc_render.html import PAGE_HTML

from duel.io import atomic_path

TEMPLATE = Path(".cache/offline_plots.html")
# The versions dvc_render 1.0.2 loads from its CDN, so the page draws as DVC's own does: npm spec, the file inlined
# from the package, and the tarball's sha512 as the registry records it.
LIBRARIES = [
    (
        "vega@5.20.2",
        "build/vega.min.js",
        "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw==",
    ),
    (
        "vega-lite@5.2.0",
        "build/vega-lite.min.js",
        "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw==",
    ),
    (
        "vega-embed@6.18.2",
        "build/vega-embed.min.js",
        "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg==",
    ),
]
SPECS = " ".join(spec for spec, _, _ in LIBRARIES)
MARKER = f"<!-- inlined by duel.offline_plots: {SPECS} -->"


def fetch_scripts() -> list[str]:
    """The three libraries' code, in load order (vega-lite and vega-embed need the globals of those before)."""
    scripts = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec, member, integrity in LIBRARIES:
            name = subprocess.run(
                ["npm", "pack", "--silent", "--pack-destination", tmp, spec],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            tarball = Path(tmp) / name
            digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
            if digest != integrity:
                raise ValueError(f"{spec}: the registry's tarball has {digest}, expected {integrity}")
            with tarfile.open(tarball) as archive:
                scripts.append(archive.extractfile(f"package/{member}").read().decode())
    return scripts


def page(scripts: list[str]) -> str:
    """DVC's page, the CDN tags' place taken by the libraries' code."""
    inlined = "\n".join(f"<script>\n{code}\n</script>" for code in scripts)
    return PAGE_HTML.replace("{scripts}", f"{MARKER}\n{inlined}")


def main() -> None:
    """Write what is missing; say so only when something was written."""
    written = False
    if not (TEMPLATE.is_file() and MARKER in TEMPLATE.read_text()):
        with atomic_path(TEMPLATE) as tmp:
            tmp.write_text(page(fetch_scripts()))
        written = True
    # DVC resolves a relative plots.html_template against .dvc/
    value = os.path.relpath(TEMPLATE, ".dvc")
    config = Config(dvc_dir=".dvc")
    if config.read("repo")["plots"].get("html_template") != value:
        with config.edit("repo") as conf:
            conf["plots"]["html_template"] = value
        written = True
    if written:
        print(f"{TEMPLATE}: {SPECS} ({TEMPLATE.stat().st_size / 2**20:.1f} MiB), plots.html_template = {value}")


if __name__ == "__main__":
    main()
