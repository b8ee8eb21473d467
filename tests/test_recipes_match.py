"""The fast default and the paper's layout learn the same thing: with LoRA dropout off (its masks are the only
randomness that depends on the micro-batch split), the per-step losses of micro-batch 16 packed and micro-batch 1 x 16
padded to max_length, on the same data and seed, agree up to float rounding. benchmarks/recipes_match.py plots both
recipes with dropout on, beside a noise reference."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

spec = importlib.util.spec_from_file_location("recipes_match", REPO / "benchmarks" / "recipes_match.py")
recipes_match = importlib.util.module_from_spec(spec)
sys.modules["recipes_match"] = recipes_match
spec.loader.exec_module(recipes_match)


def test_default_and_paper_layout_give_the_same_losses(tmp_path: Path) -> None:
    no_dropout = {"lora.dropout": 0.0}
    prepared = recipes_match.prepare(tmp_path / "prepared")
    default = recipes_match.loss_curve(prepared, tmp_path / "default", no_dropout)
    paper = recipes_match.loss_curve(prepared, tmp_path / "paper", recipes_match.PAPER_LAYOUT | no_dropout)
    assert default[0] - default[-1] > 0.3  # the loss moves, so equal curves mean something
    assert recipes_match.largest_difference(default, paper) < 1e-3
