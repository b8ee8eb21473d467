"""The Markdown report: figures from the per-step series, quality and hardware tables, the paper's claims beside
ours."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import yaml

from duel.io import write_with
from duel.params import Params, as_dict

# Reported in Battula (2025), Sections 1 and 4 (single A100 40 GB, 4-bit NF4, LoRA r=16, 200 steps). Quoted so the
# report can set them beside our measurements; they are claims to test, not results of this pipeline.
PAPER_REPORTED: dict[str, dict[str, Any]] = {
    "llama": {"accuracy": 0.84, "f1": 0.85, "train": "OOM repeatedly; 3.75 h for 50 steps; VRAM near 40 GB"},
    "deepseek": {"accuracy": 0.91, "f1": 0.924, "train": "2.5 h for 200 steps; no OOM"},
}


def read_series(live_dir: Path, name: str) -> pd.DataFrame | None:
    """A DVCLive per-step series (step, value) or None when the run did not log it."""
    path = live_dir / "plots" / "metrics" / f"{name}.tsv"
    return pd.read_csv(path, sep="\t") if path.exists() else None


def line_figure(series: dict[str, pd.DataFrame], column: str, ylabel: str, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, frame in series.items():
        ax.plot(frame["step"], frame[column], marker=".", label=label)
    ax.set(xlabel="optimizer step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def quality_table(evaluate: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    rows = [
        "| model | variant | accuracy | F1 | precision | recall | ROC-AUC | reviews/s | paper accuracy | paper F1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, variants in evaluate.items():
        paper = PAPER_REPORTED.get(key, {})
        for variant, m in variants.items():
            claimed = variant == "finetuned"
            rows.append(
                f"| {key} | {variant} | {fmt(m['accuracy'])} | {fmt(m['f1'])} | {fmt(m['precision'])} | "
                f"{fmt(m['recall'])} | {fmt(m['roc_auc'])} | {fmt(m['eval_reviews_per_s'], 1)} | "
                f"{fmt(paper.get('accuracy')) if claimed else ''} | {fmt(paper.get('f1')) if claimed else ''} |"
            )
    return rows


def hardware_table(finetune: dict[str, dict[str, Any]]) -> list[str]:
    rows = [
        "| model | device | steps | how | train time s | reviews/s | tokens/s (real) | padding share | "
        "peak VRAM alloc GiB | peak VRAM reserved GiB | NVML peak GiB | GPU util % | energy J | paper |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, m in finetune.items():
        how = f"micro-batch {m['micro_batch']} x {m['grad_accum']}, {m['padding']}"
        how += f", checkpointing {m['gradient_checkpointing']}"
        if m.get("oom_retries"):
            how += f", {m['oom_retries']} OOM back-off(s)"
        rows.append(
            f"| {key} | {m['device']} | {m['steps']} | {how} | {fmt(m['train_time_s'], 1)} | "
            f"{fmt(m['reviews_per_s'], 2)} | "
            f"{fmt(m['tokens_per_s'], 0)} | {fmt(m['padding_share'], 2)} | {fmt(m['peak_vram_allocated_gib'], 2)} | "
            f"{fmt(m['peak_vram_reserved_gib'], 2)} | {fmt(m['nvml_peak_gib'], 2)} | "
            f"{fmt(m['gpu_util_mean_pct'], 0)} | "
            f"{fmt(m['energy_j'], 0)} | {PAPER_REPORTED.get(key, {}).get('train', '')} |"
        )
    return rows


def random_weights_warning(bases: dict[str, dict[str, Any]]) -> list[str]:
    """A warning, first in the report, when any model had random weights: its accuracy means nothing."""
    random = [key for key, base in bases.items() if base["source"] == "random"]
    if not random:
        return []
    shapes = ", ".join(f"{k}: {bases[k]['num_hidden_layers']} layers, hidden {bases[k]['hidden_size']}" for k in random)
    return [
        f"> **Warning: {', '.join(random)} had random weights** (`init: random`; {shapes}). Accuracy and F1 here say "
        "nothing about the real models; time and memory are those of this architecture on this machine.",
        "",
    ]


def report_markdown(
    params: Params,
    bases: dict[str, dict[str, Any]],
    reviews: dict[str, Any],
    source: dict[str, Any],
    tokenize: dict[str, Any],
    finetune: dict[str, dict[str, Any]],
    evaluate: dict[str, dict[str, dict[str, Any]]],
) -> str:
    """reports/report.md: the warning, quality beside the paper's claims, the hardware bill, the data, the
    resolved configuration."""
    lines = ["# Fine-tuning duel: report", "", *random_weights_warning(bases)]
    lines += [
        "## Quality on the test reviews",
        "",
        f"{reviews['test']['count']} test reviews ({reviews['test']['labels']} per label), "
        f"{reviews['train']['count']} training reviews; scored by the logits of {params.data.label_words} at the "
        "answer position. The paper's numbers are its claims, quoted for comparison, not reproduced by this run.",
        "",
        *quality_table(evaluate),
        "",
        "## What the hardware paid (fine-tuning)",
        "",
        *hardware_table(finetune),
        "",
        "Definitions: `duel/telemetry.py`. Tokens/s counts real tokens (padding excluded).",
        "",
        "![training loss](figures/loss.png)",
        "",
        "![memory](figures/memory.png)",
        "",
        "## Data",
        "",
        f"Source `{source['source']}` ({source['source_kind']}, SHA-256 `{source['source_sha256'][:16]}…`); "
        f"{reviews['train_also_in_test']} training reviews that also appear in the test split were kept out of "
        "training.",
        "",
    ]
    for key, run in finetune.items():
        t = tokenize[key]["prompt_tokens"]["test"]
        lines.append(
            f"- {key}: test prompts {t['tokens_mean']} tokens on average (p95 {t['tokens_p95']}), "
            f"{t['truncated_share']:.1%} cut to {params.data.max_length} tokens; attention {run['attention']}, "
            f"precision {run['precision']}, quantization {run['quantization']}, micro-batch {run['micro_batch']} x "
            f"{run['grad_accum']}."
        )
    config = yaml.safe_dump(as_dict(params), sort_keys=False).strip()
    lines += ["", "## Resolved configuration", "", "```yaml", config, "```", ""]
    return "\n".join(lines)
