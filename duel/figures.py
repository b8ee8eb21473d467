"""The report's figures, as PNGs in plots/report/ (embedded in reports/report.md, listed under `plots:` in dvc.yaml):

- loss.png: the training loss per logged step, the answer-token cross-entropy beside the label-word loss (two-way
  softmax over the label words' logits), which the size of each model's vocabulary does not move;
- memory.png: memory during training, from zero;
- throughput.png: reviews per second, training and scoring;
- accuracy.png: accuracy with its 95% Wilson interval per model and variant (fine-tuned, zero-shot);
- confusion.png: the confusion matrix of each model and variant;
- cost.png: what each model cost: seconds (each stage's start-up hatched beneath its work), energy (NVML; not
  measured on a CPU), peak memory.

Each model keeps one colour in every figure; in the accuracy figure fine-tuned is a filled dot, zero-shot a hollow one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from duel.io import write_with
from duel.statistics import accuracy_interval

FOLDER = Path("plots/report")
SERIES = ("loss", "label_word_loss", "memory_gib")  # the DVCLive per-step series the figures draw
VARIANTS = {"finetuned": "fine-tuned", "zero_shot": "zero-shot"}
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")
NOTE_COLOR = "firebrick"
DPI = 110


@dataclass(frozen=True)
class ModelRun:
    """What the figures show of one model's run."""

    key: str
    vocab_size: int
    random_weights: bool
    series: dict[str, pd.DataFrame]
    """DVCLive per-step series (step, value) by name; a series the run did not log is absent."""
    finetune: dict[str, Any]
    """metrics/finetune_<key>.json's numbers, with `device` and `memory` (training.json's run)."""
    scoring: dict[str, dict[str, Any]]
    """Per variant (finetuned, zero_shot): its scoring metrics (eval_reviews_per_s, eval_time_s...)."""
    predictions: dict[str, pd.DataFrame]
    """Per variant: its predictions.csv (actual, predicted)."""
    paper_accuracy: float | None = None
    """The accuracy the paper claims for the fine-tuned model, drawn beside ours."""


def read_series(live_dir: Path) -> dict[str, pd.DataFrame]:
    """The per-step series of SERIES that a DVCLive folder holds."""
    folder = live_dir / "plots" / "metrics"
    return {name: pd.read_csv(folder / f"{name}.tsv", sep="\t") for name in SERIES if (folder / f"{name}.tsv").exists()}


def link(name: str, text: str) -> str:
    """A figure as a Markdown image, relative to reports/report.md."""
    return f"![{text}](../{FOLDER.as_posix()}/{name})"


def write_figures(folder: Path, runs: list[ModelRun], label_words: list[str]) -> list[Path]:
    """Every figure of the report into `folder`; returns their paths."""
    figures = {
        "loss.png": loss_figure(runs),
        "memory.png": memory_figure(runs),
        "throughput.png": throughput_figure(runs),
        "accuracy.png": accuracy_figure(runs),
        "confusion.png": confusion_figure(runs, label_words),
        "cost.png": cost_figure(runs),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, fig in figures.items():
        write_with(folder / name, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=DPI))
        plt.close(fig)
    return [folder / name for name in figures]


def color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def gpu_run(runs: list[ModelRun]) -> bool:
    return runs[0].finetune["memory"] == "cuda_reserved"


def device(runs: list[ModelRun]) -> str:
    name = runs[0].finetune["device"]
    return "CPU" if name == "cpu" else name


def memory_kind(runs: list[ModelRun]) -> str:
    return "VRAM reserved by torch" if gpu_run(runs) else "peak resident memory of the process (CPU)"


def marker(frame: pd.DataFrame) -> str:
    """A dot per logged step while they stay apart (a 20-step demo), a plain line for 200 steps."""
    return "." if len(frame) <= 50 else ""


def step_axis(ax: plt.Axes) -> None:
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def random_note(fig: Figure, runs: list[ModelRun], text: str) -> None:
    """A line under the figure when a model had random weights: its accuracy says nothing about the real model."""
    random = [run.key for run in runs if run.random_weights]
    if random:
        fig.text(0.5, 0.01, f"Random weights ({', '.join(random)}): {text}", ha="center", va="bottom", color=NOTE_COLOR)


def model_legend(fig: Figure, ax: plt.Axes) -> None:
    """The models' colours once, under the panels, where no bar can hide behind it."""
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncols=len(COLORS), frameon=False)


def missing(ax: plt.Axes, text: str) -> None:
    """An empty panel that says why, instead of a blank or a zero."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="dimgray", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def loss_figure(runs: list[ModelRun]) -> Figure:
    """Left: the answer-token cross-entropy each model trains on, over its own vocabulary; chance there is ln V, so
    the two start ln(102,400 / 32,000) = 1.2 nats apart for that reason alone (the chance lines are drawn when the
    curves come near them, as random weights do). Right: the label-word loss of both models on one axis, chance ln 2
    for both."""
    fig, (full, pair) = plt.subplots(1, 2, figsize=(12, 4.6))
    highest = max((run.series["loss"]["loss"].max() for run in runs if "loss" in run.series), default=0.0)
    for i, run in enumerate(runs):
        chance = math.log(run.vocab_size)
        if "loss" in run.series:
            frame = run.series["loss"]
            label = f"{run.key} (vocabulary {run.vocab_size:,}; chance ln V = {chance:.2f})"
            full.plot(frame["step"], frame["loss"], marker=marker(frame), color=color(i), label=label)
        if chance < 1.1 * highest:
            full.axhline(chance, color=color(i), linestyle="--", linewidth=1)
            full.text(
                0.99,
                chance,
                f"chance, ln {run.vocab_size:,}",
                transform=full.get_yaxis_transform(),
                ha="right",
                va="bottom",
                color=color(i),
                fontsize=8,
            )
        if "label_word_loss" in run.series:
            frame = run.series["label_word_loss"]
            pair.plot(frame["step"], frame["label_word_loss"], marker=marker(frame), color=color(i), label=run.key)
    full.set(ylabel="nats", title="Answer-token cross-entropy (over each model's vocabulary)")
    full.margins(y=0.1)  # room for the chance lines' labels
    step_axis(full)
    full.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    pair.set_title("Label-word loss (two-way; comparable across models)")
    if any("label_word_loss" in run.series for run in runs):
        pair.axhline(math.log(2), color="gray", linestyle="--", linewidth=1, label="chance, ln 2 = 0.69")
        top = max(
            run.series["label_word_loss"]["label_word_loss"].max() for run in runs if "label_word_loss" in run.series
        )
        pair.set_ylim(0, 1.1 * max(top, math.log(2)))
        pair.set_ylabel("nats")
        step_axis(pair)
        pair.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=3, frameon=False)
    else:
        missing(pair, "not logged by this run's fine-tunes")
    fig.suptitle("Training loss per logged step (training minimises the left one; the right one is measured beside it)")
    fig.tight_layout()
    return fig


def memory_figure(runs: list[ModelRun]) -> Figure:
    """Memory over optimizer steps, from zero: its size is the point."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    top = 0.0
    for i, run in enumerate(runs):
        if "memory_gib" in run.series:
            frame = run.series["memory_gib"]
            ax.plot(frame["step"], frame["memory_gib"], marker=marker(frame), color=color(i), label=run.key)
            top = max(top, frame["memory_gib"].max())
    ax.set(ylabel="GiB", title=f"Memory during training: {memory_kind(runs)}")
    ax.set_ylim(0, 1.15 * top or 1.0)
    step_axis(ax)
    ax.legend(loc="lower right")  # the lines run high: memory from zero leaves the bottom free
    fig.tight_layout()
    return fig


def grouped_bars(
    ax: plt.Axes,
    groups: list[str],
    runs: list[ModelRun],
    values: dict[str, list[float | None]],
    digits: int,
    under: dict[str, list[float | None]] | None = None,
) -> None:
    """One group of bars per entry of `groups`, one bar per model, each labelled with its value, from zero; an
    unmeasured value (None) is written as n/a on the axis, never drawn as a zero. `under`: a part drawn hatched
    beneath each bar (the stage's start-up before its work), labelled inside it; the bar's label is then the sum."""
    width = 0.8 / len(runs)
    tops = []
    for i, run in enumerate(runs):
        xs = np.arange(len(groups)) + (i - (len(runs) - 1) / 2) * width
        below = [u or 0.0 for u in (under or {}).get(run.key, [None] * len(groups))]
        if any(below):
            parts = ax.bar(xs, below, width * 0.95, color=color(i), alpha=0.4, hatch="//", edgecolor="white")
            inside = [f"{u:,.{digits}f}" if u else "" for u in below]
            ax.bar_label(parts, labels=inside, label_type="center", fontsize=7)
        heights = [v if v is not None else 0.0 for v in values[run.key]]
        bars = ax.bar(xs, heights, width * 0.95, bottom=below, color=color(i), label=run.key)
        totals = [v + u if v is not None else None for v, u in zip(values[run.key], below, strict=True)]
        labels = [f"{t:,.{digits}f}" if t is not None else "n/a" for t in totals]
        ax.bar_label(bars, labels=labels, padding=2, fontsize=8)
        tops += [t for t in totals if t is not None]
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylim(0, 1.15 * max(tops, default=0.0) or 1.0)  # room above the tallest bar for its label
    ax.grid(axis="y", alpha=0.3)


def throughput_figure(runs: list[ModelRun]) -> Figure:
    """Reviews per second, training (forward and backward, the whole run's optimizer steps) and scoring each variant
    (forward only): two panels, each from zero on its own scale, as scoring runs several times faster."""
    fig, (train_ax, score_ax) = plt.subplots(1, 2, figsize=(10, 4.2), width_ratios=(1, 2))
    grouped_bars(train_ax, ["training"], runs, {run.key: [run.finetune["reviews_per_s"]] for run in runs}, digits=1)
    train_ax.set(ylabel="reviews per second (higher is better)", title="Training (forward + backward)")
    scoring = {
        run.key: [run.scoring[v]["eval_reviews_per_s"] if v in run.scoring else None for v in VARIANTS] for run in runs
    }
    grouped_bars(score_ax, list(VARIANTS.values()), runs, scoring, digits=1)
    score_ax.set(ylabel="reviews per second (higher is better)", title="Scoring the test reviews (forward only)")
    model_legend(fig, train_ax)
    fig.suptitle(f"Throughput on {device(runs)}")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def accuracy_figure(runs: list[ModelRun]) -> Figure:
    """Each model and variant's accuracy with its 95% Wilson interval, the majority class's share dashed, the paper's
    claim beside each fine-tuned model; the values written out on the right."""
    rows = [(i, run, v) for i, run in enumerate(runs) for v in VARIANTS if v in run.predictions]
    random = any(run.random_weights for run in runs)
    fig, ax = plt.subplots(figsize=(9, 1.9 + 0.5 * len(rows) + 0.3 * random))
    majority = 0.5
    for y, (i, run, variant) in enumerate(reversed(rows)):
        frame = run.predictions[variant]
        labels, predicted = frame["actual"].to_numpy(), frame["predicted"].to_numpy()
        accuracy = float((labels == predicted).mean())
        low, high = accuracy_interval(labels, predicted)
        majority = max(labels.mean(), 1 - labels.mean())
        solid = variant == "finetuned"
        ax.errorbar(
            accuracy,
            y,
            xerr=[[accuracy - low], [high - accuracy]],
            fmt="o",
            color=color(i),
            markerfacecolor=color(i) if solid else "white",
            capsize=4,
            markersize=7,
            zorder=3,
        )
        values = f"{accuracy:.3f} ({low:.3f}–{high:.3f})"
        ax.text(1.03, y, values, va="center", fontsize=9, transform=ax.get_yaxis_transform())
        if solid and run.paper_accuracy is not None:
            # Larger and behind ours, so a claim equal to our accuracy rings our dot instead of hiding it.
            ax.plot(run.paper_accuracy, y, marker="D", color="black", markerfacecolor="none", markersize=11, zorder=2)
    ax.text(
        1.03,
        len(rows) - 0.5,
        "accuracy (95% interval)",
        va="bottom",
        fontsize=9,
        weight="bold",
        transform=ax.get_yaxis_transform(),
    )
    ax.axvline(majority, color="gray", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)), [f"{run.key} {VARIANTS[v]}" for _, run, v in reversed(rows)])
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.5, len(rows) - 0.5)
    ax.set_xlabel("accuracy on the test reviews")
    ax.set_title("Accuracy per model and variant, with its 95% interval (Wilson)")
    ax.grid(axis="x", alpha=0.3)
    handles = [
        plt.Line2D([], [], marker="o", color="dimgray", linestyle="none", label="fine-tuned"),
        plt.Line2D([], [], marker="o", color="dimgray", markerfacecolor="white", linestyle="none", label="zero-shot"),
        plt.Line2D([], [], color="gray", linestyle="--", label=f"majority class ({majority:.3f})"),
        plt.Line2D([], [], marker="D", color="black", markerfacecolor="none", linestyle="none", label="paper's claim"),
    ]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncols=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07 if random else 0, 1, 1))
    random_note(fig, runs, "these accuracies say nothing about the real models, nor compare with the paper's claims.")
    return fig


def confusion_figure(runs: list[ModelRun], label_words: list[str]) -> Figure:
    """One confusion matrix per model (rows) and variant (columns): counts, and each as a share of its actual class
    (the colour)."""
    variants = [v for v in VARIANTS if any(v in run.predictions for run in runs)]
    names = [word.strip() for word in label_words]
    random = any(run.random_weights for run in runs)
    fig, axes = plt.subplots(
        len(runs),
        len(variants),
        figsize=(3.4 * len(variants) + 1.6, 3.0 * len(runs) + 0.8 + 0.3 * random),
        squeeze=False,
    )
    image = None
    for r, run in enumerate(runs):
        for c, variant in enumerate(variants):
            ax = axes[r][c]
            ax.set_title(f"{run.key}, {VARIANTS[variant]}")
            if variant not in run.predictions:
                missing(ax, "not scored")
                continue
            frame = run.predictions[variant]
            counts = pd.crosstab(frame["actual"], frame["predicted"]).reindex(
                index=[0, 1], columns=[0, 1], fill_value=0
            )
            counts = counts.to_numpy()
            shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
            image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
            for a in range(2):
                for p in range(2):
                    text_color = "white" if shares[a, p] > 0.6 else "black"
                    ax.text(p, a, f"{counts[a, p]:,}\n{shares[a, p]:.0%}", ha="center", va="center", color=text_color)
            ax.set_xticks([0, 1], names)
            ax.set_yticks([0, 1], names if c == 0 else [])  # the rows are the same in every column
            ax.set_xlabel("predicted")
            if c == 0:
                ax.set_ylabel("actual")
    fig.suptitle("Confusion matrices: counts, and the share of each actual class")
    fig.tight_layout(rect=(0, 0.05 if random else 0, 0.86, 1))
    if image is not None:
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.04, pad=0.04)
        bar.set_label("share of the actual class")
    random_note(fig, runs, "these matrices say nothing about the real models.")
    return fig


def cost_figure(runs: list[ModelRun]) -> Figure:
    """What each model cost, training and scoring: wall-clock seconds (one device: GPU seconds on a GPU), energy in
    Wh from NVML's counter (null on a CPU: said, not drawn as 0) and peak memory, from zero."""
    groups = ["training", "scoring,\nfine-tuned", "scoring,\nzero-shot"]

    def values(train_key: str, scoring_key: str, scale: float = 1.0) -> dict[str, list[float | None]]:
        def scaled(value: float | None) -> float | None:
            return value / scale if value is not None else None

        return {
            run.key: [
                scaled(run.finetune.get(train_key)),
                *(scaled(run.scoring[v].get(scoring_key)) if v in run.scoring else None for v in VARIANTS),
            ]
            for run in runs
        }

    on_gpu = gpu_run(runs)
    fig, (time_ax, energy_ax, memory_ax) = plt.subplots(1, 3, figsize=(13, 4.4))
    startup = values("startup_s", "eval_startup_s")  # None in metrics written before the stages timed it
    grouped_bars(time_ax, groups, runs, values("train_time_s", "eval_time_s"), digits=1, under=startup)
    time_ax.set(ylabel="seconds, wall clock", title="Time (one GPU: GPU seconds)" if on_gpu else "Time")
    if any(v is not None for row in startup.values() for v in row):
        hatched = Patch(facecolor="lightgray", hatch="//", edgecolor="white", label="start-up: imports, model build")
        time_ax.legend(handles=[hatched], loc="upper left", fontsize=8, frameon=False)
    energy = values("energy_j", "eval_energy_j", scale=3600)
    energy_ax.set_title("Energy (NVML counter)")
    if any(v is not None for row in energy.values() for v in row):
        grouped_bars(energy_ax, groups, runs, energy, digits=2)
        energy_ax.set_ylabel("Wh")
    else:
        missing(
            energy_ax, "not measured on CPU" if not on_gpu else "not measured:\nthis GPU has no NVML energy counter"
        )
    grouped_bars(memory_ax, groups, runs, values("peak_memory_gib", "eval_peak_memory_gib"), digits=2)
    memory_ax.set(ylabel="GiB", title=f"Peak memory ({'VRAM reserved by torch' if on_gpu else 'resident, CPU'})")
    model_legend(fig, time_ax)
    fig.suptitle(f"Cost per model on {device(runs)}")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig
