"""benchmarks/peer.py's loop on CPU (--plain: transformers + PEFT in place of Unsloth, which needs a GPU), in the small
pipeline's copy: the peer does the finetune stage's work, so its first loss (before any update, the LoRA adapters
still zero) is the stage's first logged loss, on the same base weights, reviews and answer-only labels; and every
budget's run starts from the same adapters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from project_copy import StageRun, stage_env


def test_the_peer_trains_on_the_stage_s_reviews(reference_run: StageRun, tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    cmd = [sys.executable, "benchmarks/peer.py", "llama", "--plain", "--budgets", "0,0", "--results", str(results)]
    done = subprocess.run(cmd, cwd=reference_run.repo, capture_output=True, text=True, env=stage_env())
    assert done.returncode == 0, done.stderr

    line, again = [json.loads(text) for text in results.read_text().splitlines()]
    assert (line["kind"], line["model"], line["tag"]) == ("peer", "llama", "budget-none-none")
    row = line["data"]
    assert (row["steps"], row["micro_batch"], row["oom_retries"], row["memory_budget_gib"]) == (12, 16, 0, None)
    assert row["reviews_per_s"] > 0 and 0 < row["tokens_per_s"] <= row["padded_tokens_per_s"]
    series = reference_run.repo / "plots/llama/plots/metrics/loss.tsv"  # per step
    stage_first_loss = float(series.read_text().splitlines()[1].split("\t")[-1])
    assert abs(row["first_loss"] - stage_first_loss) < 1e-3, (row["first_loss"], stage_first_loss)
    assert row["final_loss"] != row["first_loss"]  # it trained
    assert (again["data"]["first_loss"], again["data"]["final_loss"]) == (row["first_loss"], row["final_loss"])
