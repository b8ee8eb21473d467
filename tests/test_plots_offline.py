"""`dvc plots show` in this project writes a page that draws with no network: Vega, Vega-Lite and vega-embed are
inlined from the template that `make setup` writes (duel.offline_plots), and no script is loaded from elsewhere.
DVC's own page, in the same copy, loads them from a CDN, and the same check catches it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from dvc_render.html import PAGE_HTML
from project_copy import copy_sources, stage_env

from duel.offline_plots import LIBRARIES, TEMPLATE

ROOT = Path(__file__).resolve().parents[1]
# <script src="https://...">, src='http://...', src=//host/...: a script from anywhere but the page's own folder.
REMOTE_SCRIPT = re.compile(r"""<script[^>]*\ssrc\s*=\s*["']?(?:https?:)?//[^>]*>""", re.IGNORECASE)
# Each bundle opens by defining its global (the plot divs call vegaEmbed, which calls vegaLite and vega).
GLOBALS = (").vega={}", ").vegaLite={}", ").vegaEmbed=")
LOSS = [11.25, 10.5, 9.75, 9.125]


def dvc(repo: Path, *args: str) -> str:
    done = subprocess.run(["dvc", *args], cwd=repo, env=stage_env(), capture_output=True, text=True)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def show(repo: Path, *args: str) -> str:
    """dvc plots show `args` in `repo`; the page it wrote."""
    dvc(repo, "plots", "show", "-o", "page", *args)
    return (repo / "page" / "index.html").read_text()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project (a git repository, as DVC needs; .dvc/config as committed) with the page template that
    `make setup` wrote and four steps of llama's training loss."""
    assert (ROOT / TEMPLATE).is_file(), f"{TEMPLATE} is missing: make setup writes it (python -m duel.offline_plots)"
    repo = copy_sources(tmp_path_factory.mktemp("plots"))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / TEMPLATE).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / TEMPLATE, repo / TEMPLATE)
    series = repo / "plots/llama/plots/metrics/loss.tsv"
    series.parent.mkdir(parents=True)
    series.write_text("step\tloss\n" + "".join(f"{step}\t{loss}\n" for step, loss in enumerate(LOSS)))
    return repo


def test_project_page_inlines_vega_and_loads_nothing_remote(project: Path) -> None:
    html = show(project)
    assert REMOTE_SCRIPT.findall(html) == []
    assert all(html.count(definition) == 1 for definition in GLOBALS), GLOBALS
    for spec, _, _ in LIBRARIES:
        assert f'"{spec.split("@")[1]}"' in html, spec  # the bundle's own version string
    assert "Training loss (answer token)" in html
    assert all(f'"loss": "{loss}"' in html for loss in LOSS)


def test_dvc_default_page_loads_vega_from_a_cdn(project: Path, tmp_path: Path) -> None:
    """The page DVC writes with no template of the project's (dvc_render's PAGE_HTML): the check above fails on it."""
    default = tmp_path / "default.html"
    default.write_text(PAGE_HTML)
    html = show(project, "--html-template", str(default))
    assert len(REMOTE_SCRIPT.findall(html)) == 3
    assert not any(definition in html for definition in GLOBALS)
