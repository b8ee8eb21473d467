"""The demo end to end, as a user runs it: `make demo`'s DVC experiment in a temporary copy of the repository, then
`dvc exp run -S lora.r=8`, asserting on the metrics, plots and report the stages write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from project_copy import copy_sources

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path) -> str:
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_CACHE": str(SHARED / "hf" / "hub"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A copy of the working tree (tracked and untracked files) beside ../shared, committed, with the demo run."""
    repo = copy_sources(tmp_path_factory.mktemp("clone"))
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    run(["git", "init", "-q"], repo)
    run([*git, "add", "-A"], repo)
    run([*git, "commit", "-qm", "copy"], repo)
    log = run([sys.executable, "-m", "duel.profile", "profiles/demo.yaml"], repo)
    return repo, log


def test_demo_is_a_named_experiment(demo: tuple[Path, str]) -> None:
    repo, log = demo
    assert "Ran experiment(s): demo" in log
    assert "demo" in run(["dvc", "exp", "list", "--name-only"], repo)


def test_demo_metrics_cover_both_models_and_baselines(demo: tuple[Path, str]) -> None:
    repo, _ = demo
    evaluate = json.loads((repo / "metrics/evaluate.json").read_text())
    assert set(evaluate) == {"llama", "deepseek"}
    for key in evaluate:
        assert set(evaluate[key]) == {"finetuned", "zero_shot"}
        for metrics in evaluate[key].values():
            for name in ("accuracy", "f1", "precision", "recall", "roc_auc"):
                assert 0.0 <= metrics[name] <= 1.0, (key, name)
            assert metrics["reviews"] == 400
            assert sum(map(sum, metrics["confusion_matrix"])) == 400
        finetune = json.loads((repo / f"metrics/finetune_{key}.json").read_text())
        assert finetune["steps"] == 20 and finetune["quantization"] == "nf4-dq"
        assert finetune["reviews_per_s"] > 0 and finetune["peak_vram_allocated_gib"] is None  # no GPU here
        assert (repo / f"models/adapters/{key}/adapter_model.safetensors").stat().st_size > 0
    data = json.loads((repo / "metrics/data.json").read_text())
    assert data["train"]["labels"] == {"0": 160, "1": 160}


def test_demo_per_step_series_and_dvc_plots(demo: tuple[Path, str]) -> None:
    repo, _ = demo
    for key in ("llama", "deepseek"):
        for series in ("loss", "memory_gib", "tokens_per_s"):
            frame = pd.read_csv(repo / f"plots/{key}/plots/metrics/{series}.tsv", sep="\t")
            assert frame["step"].max() == 20 and frame[series].notna().all(), (key, series)
    loss = pd.read_csv(repo / "plots/llama/plots/metrics/loss.tsv", sep="\t")["loss"]
    assert loss.iloc[-1] < loss.iloc[0]  # LoRA learns to say one of the two label words
    plots = json.loads(run(["dvc", "plots", "show", "--json"], repo))["data"]
    for title, column in (("Training loss", "loss"), ("Memory during training", "memory_gib")):
        (name,) = [n for n in plots if n.startswith(title)]
        values = plots[name][0]["content"]["data"]["values"]
        drawn = {v["filename"].split("/")[0] for v in values if v.get(column) not in (None, "")}
        assert drawn == {"llama", "deepseek"}, (title, drawn)  # both models on one chart
    assert any(n.startswith("Confusion, llama") for n in plots)


def test_demo_report(demo: tuple[Path, str]) -> None:
    repo, _ = demo
    report = (repo / "reports/report.md").read_text()
    assert "had random weights" in report
    assert report.count("| llama | ") >= 3 and report.count("| deepseek | ") >= 3  # quality x2 + hardware
    assert "0.924" in report and "0.85" in report  # the paper's claims are quoted beside ours
    for figure in ("loss.png", "memory.png"):
        assert (repo / "reports/figures" / figure).read_bytes()[:4] == b"\x89PNG"


def test_lora_rank_experiment_reruns_only_finetune_and_after(demo: tuple[Path, str]) -> None:
    repo, _ = demo
    log = run(["dvc", "exp", "run", "-S", "lora.r=8"], repo)
    assert "Stage 'download' didn't change, skipping" in log
    assert "Stage 'tokenize' didn't change, skipping" in log
    for stage in ("finetune_llama", "finetune_deepseek", "evaluate", "report"):
        assert f"Running stage '{stage}'" in log
    finetune = json.loads((repo / "metrics/finetune_llama.json").read_text())
    assert finetune["trainable_parameters"] == 46080  # half of r=16's 92,160
    params = run(["dvc", "exp", "diff", "demo", "--json"], repo)
    diff = json.loads(params)
    assert diff["params"]["params.yaml"]["lora.r"] == {"old": 16, "new": 8, "diff": -8}
    metrics = run(["dvc", "metrics", "diff", "demo", "--json"], repo)
    assert "trainable_parameters" in json.loads(metrics)["metrics/finetune_llama.json"]
