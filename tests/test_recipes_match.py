"""The fast default and the paper's layout learn the same thing: with LoRA dropout off (its masks are the only
randomness that depends on the micro-batch split), the per-step losses of micro-batch 16 in one flattened row and
micro-batch 1 x 16 padded to max_length, on the same data and seed, agree up to float rounding.
benchmarks/recipes_match.py plots both recipes with dropout on, beside a noise reference."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import REPO
from project_copy import SMALL_RUN, StageRun, run_stage_in_process

pytestmark = pytest.mark.slow

spec = importlib.util.spec_from_file_location("recipes_match", REPO / "benchmarks" / "recipes_match.py")
recipes_match = importlib.util.module_from_spec(spec)
sys.modules["recipes_match"] = recipes_match
spec.loader.exec_module(recipes_match)


def test_default_and_paper_layout_give_the_same_losses(reference_run: StageRun, tmp_path: Path) -> None:
    # The reference run's data, base model and tokens are the ones recipes_match.prepare makes from COMMON.
    assert {key: SMALL_RUN[key] for key in recipes_match.COMMON if key.startswith("data.")} == {
        key: value for key, value in recipes_match.COMMON.items() if key.startswith("data.")
    }
    common = recipes_match.COMMON | {"lora.dropout": 0.0}
    default = recipes_match.loss_curve(reference_run.repo, tmp_path / "default", common, run_stage_in_process)
    paper_layout = recipes_match.PAPER_LAYOUT | common
    paper = recipes_match.loss_curve(reference_run.repo, tmp_path / "paper", paper_layout, run_stage_in_process)
    assert default[0] - default[-1] > 0.3  # the loss moves, so equal curves mean something
    assert recipes_match.largest_difference(default, paper) < 1e-3
