"""Seed studies: the runs of one study are found in `dvc exp show --json`, aggregated per model and set against
the seed-to-seed spread; runs with other params are refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from duel.errors import DuelError
from duel.seeds import study, study_figure, study_markdown
from duel.statistics import mean_interval

# Accuracy of (llama, deepseek) per seeds.train value, as three finished experiments would report them.
RUNS = {1: (0.80, 0.86), 2: (0.82, 0.87), 3: (0.78, 0.85)}


def experiment(name: str, seed: int, accuracies: tuple[float, float], lora_r: int = 16) -> dict[str, Any]:
    metrics = {
        key: {"accuracy": a, "f1": a - 0.01, "roc_auc": a + 0.05}
        for key, a in zip(("llama", "deepseek"), accuracies, strict=True)
    }
    params = {
        "seeds": {"data": 42, "train": seed, "weights": 42},
        "lora": {"r": lora_r},
        "models": {"llama": {"init": "pretrained"}, "deepseek": {"init": "pretrained"}},
    }
    data = {
        "params": {"params.yaml": {"data": params}},
        "metrics": {
            "metrics/evaluate.json": {"data": metrics},
            "metrics/data.json": {"data": {"reviews": {"test": {"count": 25000}}}},
        },
    }
    return {"rev": f"{seed:040d}", "name": name, "data": data}


def shown(extra: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    runs = [experiment(f"seed-train{s}", s, acc) for s, acc in RUNS.items()]
    other = experiment("rank8", 42, (0.5, 0.5), lora_r=8)  # not part of the study: its name says so
    return [{"rev": "workspace", "data": {}, "experiments": [{"revs": [r]} for r in [*runs, other, *(extra or [])]]}]


def test_study_collects_the_runs_of_one_seed():
    frame, shared = study(shown(), "train")
    assert sorted(frame["seed"].unique()) == [1, 2, 3]
    assert frame.loc[(frame["seed"] == 2) & (frame["model"] == "deepseek"), "accuracy"].item() == 0.87
    assert shared["lora.r"] == 16


def test_study_refuses_runs_with_other_params():
    stray = experiment("seed-train4", 4, (0.7, 0.7), lora_r=8)
    with pytest.raises(DuelError, match=r"seed-train4 differs .* lora\.r"):
        study(shown([stray]), "train")


def test_study_without_runs_says_how_to_make_them():
    with pytest.raises(DuelError, match=r"duel\.seeds queue"):
        study(shown(), "data")


def test_gap_is_set_against_the_spread(tmp_path: Path):
    frame, shared = study(shown(), "train")
    text = study_markdown(frame, shared, "train")
    gaps = np.array([d - ll for ll, d in RUNS.values()])  # 6, 5, 7 points
    mean, low, high = mean_interval(gaps)
    assert f"{100 * mean:+.1f} points on average over 3 seeds" in text
    assert f"[{100 * low:+.1f}, {100 * high:+.1f}]" in text
    assert low > 0 and "excludes zero" in text and "deepseek is ahead" in text
    llama = np.array([ll for ll, _ in RUNS.values()])
    assert f"| llama | {llama.mean():.3f} [" in text and f"| {llama.std(ddof=1):.3f} |" in text
    study_figure(frame, "train", tmp_path / "accuracy.png")
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000


def test_a_gap_within_the_spread_is_not_a_result():
    runs = {1: (0.80, 0.86), 2: (0.84, 0.79), 3: (0.81, 0.83)}
    data = [
        {
            "rev": "workspace",
            "data": {},
            "experiments": [{"revs": [experiment(f"seed-train{s}", s, a)]} for s, a in runs.items()],
        }
    ]
    frame, shared = study(data, "train")
    assert "includes zero: these seeds cannot tell the two models apart" in study_markdown(frame, shared, "train")


def test_mean_interval_by_hand():
    # values 1, 2, 3: mean 2, sd 1, t(2, 0.975) = 4.302653, half-width 4.302653 / sqrt(3) = 2.484138
    mean, low, high = mean_interval(np.array([1.0, 2.0, 3.0]))
    assert (
        mean == 2.0 and low == pytest.approx(2 - 2.484138, abs=1e-6) and high == pytest.approx(2 + 2.484138, abs=1e-6)
    )
    assert np.isnan(mean_interval(np.array([0.7]))[1])
