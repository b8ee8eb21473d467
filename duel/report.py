"""The Markdown report: quality with its 95% intervals, the paired comparisons that decide the duel, the hardware
bill, the paper's claims beside ours, and the figures of duel/figures.py linked where they belong."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd
import yaml

from duel.claims import (
    PAPER_TIMES,
    claims_markdown,
    gap_claim,
    lora_claim,
    memory_claims,
    quality_claims,
    stability_claim,
    table3_markdown,
    time_claims,
)
from duel.errors import DataError
from duel.figures import link
from duel.params import Params, as_dict
from duel.statistics import (
    accuracy_difference,
    accuracy_interval,
    discordant,
    f1_interval,
    mcnemar_exact,
    roc_auc_interval,
)

# Reported in Battula (2025), Sections 1 and 4 (single A100 40 GB, 4-bit NF4, LoRA r=16, 200 steps). Quoted so the
# report can set them beside our measurements; they are claims to test, not results of this pipeline.
PAPER_REPORTED: dict[str, dict[str, Any]] = {
    "llama": {"accuracy": 0.84, "f1": 0.85, "train": "OOM repeatedly; 3.75 h for 50 steps; VRAM near 40 GB"},
    "deepseek": {"accuracy": 0.91, "f1": 0.924, "train": "2.5 h for 200 steps; no OOM"},
}


# 1,000 bootstrap test sets: the percentile interval's ends are the 25th and 975th of them.
BOOTSTRAP_RESAMPLES = 1000
SIGNIFICANCE = 0.05  # a comparison's McNemar p below this is called a difference
VARIANTS = {"finetuned": "fine-tuned", "zero_shot": "zero-shot"}


@dataclass(frozen=True)
class Comparison:
    """Accuracy of `challenger` minus accuracy of `baseline` on the reviews both scored, paired by review_id."""

    baseline: str
    challenger: str
    reviews: int
    only_baseline_right: int
    only_challenger_right: int
    difference: float
    low: float
    high: float
    """The 95% interval of the difference."""
    p_value: float
    """Exact McNemar test on the reviews only one of the two gets right."""
    random_weights: bool
    """Either side had random weights."""


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def with_interval(value: float | None, interval: tuple[float, float]) -> str:
    """0.812 (0.771–0.847); n/a for a metric a one-class test set leaves undefined."""
    if value is None:
        return fmt(value)
    return f"{fmt(value)} ({interval[0]:.3f}–{interval[1]:.3f})"


def quality_intervals(predictions: pd.DataFrame, seed: int) -> dict[str, tuple[float, float]]:
    """95% intervals of one run's accuracy (Wilson), F1 and ROC-AUC (seeded bootstrap over its reviews)."""
    labels, predicted, scores = (predictions[c].to_numpy() for c in ("actual", "predicted", "score"))
    return {
        "accuracy": accuracy_interval(labels, predicted),
        "f1": f1_interval(labels, predicted, seed, BOOTSTRAP_RESAMPLES),
        "roc_auc": roc_auc_interval(labels, scores, seed, BOOTSTRAP_RESAMPLES),
    }


def quality_table(
    evaluate: dict[str, dict[str, dict[str, Any]]],
    intervals: dict[str, dict[str, dict[str, tuple[float, float]]]],
    random_weights: set[str],
) -> list[str]:
    """One row per model and variant, each accuracy, F1 and ROC-AUC with its 95% interval; the paper's claims beside
    the fine-tuned rows, marked as not comparable beside a model that had random weights."""
    rows = [
        "| model | variant | accuracy (95% CI) | F1 (95% CI) | precision | recall | ROC-AUC (95% CI) | reviews/s | "
        "paper accuracy | paper F1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, variants in evaluate.items():
        paper = PAPER_REPORTED.get(key, {})
        caveat = " (not comparable: random weights)" if key in random_weights else ""
        for variant, m in variants.items():
            ci = intervals[key][variant]
            claimed = variant == "finetuned"
            rows.append(
                f"| {key} | {variant} | {with_interval(m['accuracy'], ci['accuracy'])} | "
                f"{with_interval(m['f1'], ci['f1'])} | {fmt(m['precision'])} | {fmt(m['recall'])} | "
                f"{with_interval(m['roc_auc'], ci['roc_auc'])} | {fmt(m['eval_reviews_per_s'], 1)} | "
                f"{fmt(paper.get('accuracy')) + caveat if claimed else ''} | "
                f"{fmt(paper.get('f1')) + caveat if claimed else ''} |"
            )
    return rows


def paired(baseline: pd.DataFrame, challenger: pd.DataFrame, names: tuple[str, str]) -> pd.DataFrame:
    """Two runs' predictions on the same reviews, one row per review_id (columns suffixed _a and _b); rows are
    matched by id, never by position."""
    ids = [set(frame["review_id"]) for frame in (baseline, challenger)]
    if ids[0] != ids[1] or len(ids[0]) != len(baseline) or len(ids[1]) != len(challenger):
        raise DataError(
            f"report: {names[0]} and {names[1]} scored different reviews ({len(ids[0] ^ ids[1])} ids in one only, "
            "or an id twice); run `dvc repro` so that both score the same data/tokenized test set"
        )
    both = baseline.merge(challenger, on="review_id", suffixes=("_a", "_b"), validate="one_to_one")
    if (both["actual_a"] != both["actual_b"]).any():
        raise DataError(f"report: {names[0]} and {names[1]} give one review different labels; run `dvc repro`")
    return both


def compare(baseline: str, challenger: str, predictions: dict[str, pd.DataFrame], random_weights: bool) -> Comparison:
    """The paired accuracy difference challenger - baseline with its interval and McNemar p-value."""
    both = paired(predictions[baseline], predictions[challenger], (baseline, challenger))
    labels, a, b = both["actual_a"].to_numpy(), both["predicted_a"].to_numpy(), both["predicted_b"].to_numpy()
    only_a, only_b = discordant(labels, a, b)
    difference, low, high = accuracy_difference(labels, a, b)
    p_value = mcnemar_exact(labels, a, b)
    return Comparison(baseline, challenger, len(both), only_a, only_b, difference, low, high, p_value, random_weights)


def comparisons(keys: list[str], predictions: dict[str, pd.DataFrame], random_weights: set[str]) -> list[Comparison]:
    """The comparisons that decide the duel: each later model's fine-tune against each earlier one's (deepseek
    against llama), then each fine-tune against its own zero-shot base. `predictions` is keyed "<key> <variant>"."""
    pairs = [((a, "finetuned"), (b, "finetuned")) for a, b in itertools.combinations(keys, 2)]
    pairs += [((key, "zero_shot"), (key, "finetuned")) for key in keys]
    return [
        compare(f"{a} {VARIANTS[va]}", f"{b} {VARIANTS[vb]}", predictions, bool({a, b} & random_weights))
        for (a, va), (b, vb) in pairs
    ]


def points(share: float) -> str:
    """A difference in accuracy as signed percentage points: 0.0125 -> +1.2."""
    return f"{100 * share:+.1f}"


def p_text(p_value: float) -> str:
    return "p < 0.001" if p_value < 0.001 else f"p = {p_value:.3f}"


def comparison_table(rows: list[Comparison]) -> list[str]:
    table = [
        "| comparison | reviews | only the first right | only the second right | accuracy difference, points "
        "(95% CI) | exact McNemar |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in rows:
        table.append(
            f"| {c.challenger} vs {c.baseline} | {c.reviews} | {c.only_challenger_right} | {c.only_baseline_right} | "
            f"{points(c.difference)} ({points(c.low)} to {points(c.high)}) | {p_text(c.p_value)} |"
        )
    return table


def conclusion(c: Comparison) -> str:
    """One plain sentence on what this comparison can and cannot say at this test size."""
    name = f"{c.challenger} vs {c.baseline}"
    if c.only_baseline_right + c.only_challenger_right == 0:
        text = f"{name}: the two give the same answer on all {c.reviews} reviews; nothing here separates them."
    elif c.p_value >= SIGNIFICANCE:
        text = (
            f"{name}: the difference ({points(c.difference)} points) is within what chance gives on {c.reviews} "
            f"reviews ({p_text(c.p_value)}); this run cannot tell them apart: a true difference anywhere from "
            f"{points(c.low)} to {points(c.high)} points fits these reviews."
        )
    else:
        # The interval of (better - worse): the difference's own, or its mirror when the baseline is the better.
        better, worse, low, high = (
            (c.challenger, c.baseline, c.low, c.high)
            if c.difference > 0
            else (c.baseline, c.challenger, -c.high, -c.low)
        )
        text = (
            f"{name}: {better} is more accurate than {worse} by more than chance gives on {c.reviews} reviews "
            f"({p_text(c.p_value)}), by {points(low)} to {points(high)} points on reviews like these; one "
            "training run, so how much another seed would move it is not measured."
        )
    if c.random_weights:
        text += " Random weights: this compares networks that never learned language, not the models."
    return text


def hardware_table(finetune: dict[str, dict[str, Any]]) -> list[str]:
    rows = [
        "| model | device | steps | how | train time s | start-up s | reviews/s | tokens/s (real) | MFU | "
        "padding share | peak VRAM alloc GiB | peak VRAM reserved GiB | NVML peak GiB | GPU util % | energy J | "
        "paper |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, m in finetune.items():
        how = f"micro-batch {m['micro_batch']} x {m['grad_accum']}, {m['padding']}"
        how += f", checkpointing {m['gradient_checkpointing']}"
        if m.get("base_weights") == "unquantized" and m.get("quantization") not in (None, "none"):
            how += ", 4-bit base dequantized for training"
        elif m.get("base_weights") == "partly dequantized":
            how += f", 4-bit base dequantized in {m['dequantized_layers']} layers for training"
        if m.get("oom_retries"):
            how += f", {m['oom_retries']} OOM back-off(s)"
        rows.append(
            f"| {key} | {m['device']} | {m['steps']} | {how} | {fmt(m['train_time_s'], 1)} | "
            f"{fmt(m.get('startup_s'), 1)} | {fmt(m['reviews_per_s'], 2)} | "
            f"{fmt(m['tokens_per_s'], 0)} | {fmt(m.get('mfu'), 3)} | {fmt(m['padding_share'], 2)} | "
            f"{fmt(m['peak_vram_allocated_gib'], 2)} | "
            f"{fmt(m['peak_vram_reserved_gib'], 2)} | {fmt(m['nvml_peak_gib'], 2)} | "
            f"{fmt(m['gpu_util_mean_pct'], 0)} | "
            f"{fmt(m['energy_j'], 0)} | {PAPER_REPORTED.get(key, {}).get('train', '')} |"
        )
    return rows


def random_weights_warning(bases: dict[str, dict[str, Any]], random: list[str]) -> list[str]:
    """A warning, first in the report, when any model (`random`: their keys) had random weights: its accuracy means
    nothing."""
    if not random:
        return []
    shapes = ", ".join(f"{k}: {bases[k]['num_hidden_layers']} layers, hidden {bases[k]['hidden_size']}" for k in random)
    return [
        f"> **Warning: {', '.join(random)} had random weights** (`init: random`; {shapes}). Accuracy and F1 here say "
        "nothing about the real models; time and memory are those of this architecture on this machine.",
        "",
    ]


def claims_section(
    params: Params,
    bases: dict[str, dict[str, Any]],
    finetune: dict[str, dict[str, Any]],
    evaluate: dict[str, dict[str, dict[str, Any]]],
    intervals: dict[str, dict[str, dict[str, tuple[float, float]]]],
    paired_rows: list[Comparison],
    losses: dict[str, pd.Series],
    ablation: dict[str, dict[str, dict[str, Any]]],
    peers: list[dict[str, Any]] | None = None,
) -> list[str]:
    """Each measurable claim of the paper beside this run's measurement and a verdict (duel/claims.py), then its
    Table 3 as re-measured on a GPU by the benchmarks, and the benchmarks' peer table (duel.claims.peer_rows)."""
    random_weights = {key for key, base in bases.items() if base["source"] == "random"}
    duel = next(
        (c for c in paired_rows if c.challenger == "deepseek fine-tuned" and c.baseline == "llama fine-tuned"), None
    )
    claimed_gap = PAPER_REPORTED["deepseek"]["accuracy"] - PAPER_REPORTED["llama"]["accuracy"]
    finetuned = {key: variants["finetuned"] for key, variants in evaluate.items()}
    claims = [
        *quality_claims(finetuned, {k: v["finetuned"] for k, v in intervals.items()}, random_weights, PAPER_REPORTED),
        *gap_claim(duel, claimed_gap),
        *memory_claims(ablation, finetune),
        *time_claims(ablation, {k: v for k, v in PAPER_TIMES.items() if k in finetune}),
        *stability_claim(losses, random_weights),
        *lora_claim(finetune, bases, params.lora.r, {key for key, m in params.models.items() if m.overrides}),
    ]
    return [
        "## The paper's claims, tested",
        "",
        "Each claim of Battula (2025) that a measurement can decide, beside what was measured and a verdict; the rules "
        "are in `duel/claims.py`. Memory and time claims are judged on the paper's Table 3 re-measured on a GPU at "
        "the paper's recipe (`benchmarks/records.jsonl`), since they are about that recipe, not this run's.",
        "",
        *claims_markdown(claims),
        "",
        "### The paper's Table 3, re-measured",
        "",
        "The paper's recipe, then the same with one technique changed (`benchmarks/run_device.py --ablation`); what a "
        "technique saves is 1 - the recipe's peak / the variant's peak.",
        "",
        *table3_markdown(ablation),
        "",
        "### Against Unsloth, budget by budget",
        "",
        "Measured on a GPU with random weights, not by this run (`benchmarks/run_device.py --peer`; the run names the "
        "GPU): this project's fine-tune and Unsloth's on the same reviews, steady reviews/s after 2 steps, then "
        "torch's peak reserved / NVML's peak GiB (the card's memory, the CUDA context included: \"over budget\" "
        "where a card of the budget's size would not have held the run) (`benchmarks/README.md`).",
        "",
        pd.DataFrame(peers).to_markdown(index=False) if peers else "No peer measurement in benchmarks/records.jsonl.",
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
    predictions: dict[str, dict[str, pd.DataFrame]],
    losses: dict[str, pd.Series],
    ablation: dict[str, dict[str, dict[str, Any]]],
    peers: list[dict[str, Any]] | None = None,
) -> str:
    """reports/report.md: the warning, quality with its intervals beside the paper's claims, the paired comparisons,
    the paper's claims with a verdict each and its Table 3 re-measured, the hardware bill, the data, the resolved
    configuration. `predictions[key][variant]`: that run's predictions.csv; `losses[key]`: its per-step training
    loss; `ablation`: the re-measured Table 3 (duel.claims.newest_ablation); `peers`: duel.claims.peer_rows."""
    random = [key for key, base in bases.items() if base["source"] == "random"]
    random_weights = set(random)
    intervals = {
        key: {variant: quality_intervals(frame, params.seeds.data) for variant, frame in variants.items()}
        for key, variants in predictions.items()
    }
    by_name = {f"{key} {VARIANTS[v]}": frame for key, variants in predictions.items() for v, frame in variants.items()}
    paired_rows = comparisons(list(evaluate), by_name, random_weights)
    lines = ["# Fine-tuning duel: report", "", *random_weights_warning(bases, random)]
    lines += [
        "## Quality on the test reviews",
        "",
        f"{reviews['test']['count']} test reviews ({reviews['test']['labels']} per label), "
        f"{reviews['train']['count']} training reviews; scored by the logits of {params.data.label_words} at the "
        "answer position. The paper's numbers are its claims, quoted for comparison, not reproduced by this run.",
        f"Intervals are 95%: Wilson for accuracy, a percentile bootstrap over the test reviews for F1 and ROC-AUC "
        f"({BOOTSTRAP_RESAMPLES} resamples, seed {params.seeds.data}); they cover which reviews were drawn, not "
        "another training seed (python -m duel.seeds measures that).",
        "",
        *quality_table(evaluate, intervals, random_weights),
        "",
        link("accuracy.png", "accuracy with its 95% interval per model and variant"),
        "",
        link("confusion.png", "confusion matrices"),
        "",
        "### Paired comparisons",
        "",
        "Two classifiers on the same reviews, matched by review id: the accuracy of the first named minus that of "
        "the second, in percentage points, with its 95% interval, and the exact McNemar test on the reviews only one "
        "of them gets right (`duel/statistics.py`).",
        "",
        *comparison_table(paired_rows),
        "",
        *(f"- {conclusion(c)}" for c in paired_rows),
        "",
        *claims_section(params, bases, finetune, evaluate, intervals, paired_rows, losses, ablation, peers),
        "## What the hardware paid (fine-tuning)",
        "",
        *hardware_table(finetune),
        "",
        "Definitions: `duel/telemetry.py`. Tokens/s counts real tokens (padding excluded).",
        "",
        "The answer-token cross-entropy is over each model's whole vocabulary, so its chance level ln V differs "
        "between the models before anything is learned ("
        + "; ".join(f"{k}: {b['vocab_size']:,} words, {math.log(b['vocab_size']):.2f} nats" for k, b in bases.items())
        + "). The label-word loss logged beside it (two-way softmax over the two label words' logits) is "
        "ln 2 = 0.69 at chance for every model: it compares them.",
        "",
        link("loss.png", "training loss: answer-token cross-entropy and label-word loss"),
        "",
        link("memory.png", "memory during training"),
        "",
        link("throughput.png", "throughput: training and scoring reviews per second"),
        "",
        link("cost.png", "cost per model: time (start-up hatched), energy, peak memory"),
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
