"""The paper's measurable claims beside what this run (and the benchmark records' re-measured Table 3) measured, each
with a verdict: supported, contradicted, not supported at this test size, or not measurable on this run, and why.

The verdict rules, so that a reader can check each one:
- a quality claim (accuracy, F1) is supported when the paper's figure lies inside our 95% interval, contradicted when
  it lies outside; with random weights it is not measurable;
- a memory saving of Table 3 is supported when our saving lies within TOLERANCE of the paper's figure (or range);
- a time claim is scaled by the A100's matrix rate against the H200's (A100_SLOWER) and is contradicted when even
  the scaled time is less than half the paper's;
- a peak "near 40 GB" means at least NEAR of 40 GB.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from duel.report import Comparison

# The paper's GPU: an A100 with 40 GB (40e9 bytes = 37.25 GiB). Its dense fp16/bf16 matrix rate is 312 TFLOP/s
# against the H200's 989 (NVIDIA's datasheets): a step that takes t on the H200 takes at most about 3.2 t there.
A100_GIB = 40e9 / 2**30
A100_SLOWER = 989 / 312
NEAR = 0.9
TOLERANCE = 0.05  # five percentage points around a Table 3 saving
PLATEAU = 0.1  # a loss plateaus when its second half falls by less than a tenth of the whole drop
RECORDS = Path("benchmarks/records.jsonl")
# Battula (2025): "3.75 hours for 50 steps" (Llama-2), "completing in 2.5 hours" (DeepSeek, 200 steps).
PAPER_TIMES = {"llama": (3.75, 50), "deepseek": (2.5, 200)}

# Table 3's rows re-measured: the variant of the ablation (benchmarks/run_device.py --ablation) that switches the
# technique off, what the paper says the technique saves, and that saving as a range (None: not comparable).
TABLE3: dict[str, tuple[str, str, tuple[float, float] | None]] = {
    "no-4bit": ("4-bit NF4 quantization", "65-70% of memory", (0.65, 0.70)),
    "no-checkpointing": ("gradient checkpointing", "33% of memory", (0.33, 0.33)),
    "eager-attention": ("Flash attention (fused attention kernel)", "40% of attention memory", None),
    "no-double-quant": ("double quantization", "not in Table 3", None),
    "micro-batch-16": ("micro-batch 1 x 16 instead of 16 x 1", "not in Table 3", None),
}


@dataclass(frozen=True)
class Claim:
    claim: str
    """What the paper says, quoted or closely paraphrased."""
    measured: str
    verdict: str
    why: str


def read_records(path: Path = RECORDS) -> list[dict[str, Any]]:
    """benchmarks/records.jsonl; empty when there is none."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


PEER_COLUMNS = ["model", "budget_gib", "run", "project", "unsloth", "plain stack", "project / unsloth"]
PEER_COLUMNS.append("project / plain")


def within_budget(card_gib: float | None, budget_gib: float | None) -> bool | None:
    """Whether NVML's peak (the card's memory in use, the CUDA context included) stayed within the memory budget, so
    that a card of the budget's size would have held the run: True without a budget, None where NVML was not read."""
    if not budget_gib:
        return True
    return None if card_gib is None else card_gib <= budget_gib


def figure(r: dict[str, Any]) -> str:
    """Steady reviews/s with the memory (torch's reserved peak, then NVML's: the card's, the CUDA context included,
    marked where it went over the budget), utilization and way of a fine-tune or peer record."""
    way = f", mb {r['micro_batch']} after {r['oom_retries']} OOM" if r["oom_retries"] else ""
    if r["stage"] == "peer":
        way = f", mb {r['micro_batch']}" + ("" if r["gradient_checkpointing"] else ", no ckpt")
    card, budget = r.get("nvml_peak_gib"), r.get("memory_budget_gib")
    memory = f"{r['peak_vram_gib']:.1f}" + (f" / {card:.1f}" if card is not None else "") + " GiB"
    memory += " over budget" if within_budget(card, budget) is False else ""
    return f"{r['steady_reviews_per_s']:.1f} ({memory}, {r['gpu_util_pct']:.0f}% busy{way})"


@dataclass(frozen=True)
class PeerBudget:
    """One budget of the newest call that ran the peer for a model: the project's fine-tune, the peer's fastest way
    within the budget, the plain stack's one configuration (all records)."""

    model: str
    run: str
    budget_gib: float | None
    project: dict[str, Any]
    peer: dict[str, Any]
    plain: dict[str, Any]

    @property
    def ratio(self) -> float:
        """The project's steady reviews/s over the peer's."""
        return self.project["steady_reviews_per_s"] / self.peer["steady_reviews_per_s"]

    @property
    def project_fits(self) -> bool:
        """Whether the project's NVML peak (the card's memory, the CUDA context included) stayed within the budget."""
        return within_budget(self.project.get("nvml_peak_gib"), self.budget_gib) is True


def peer_budgets(records: list[dict[str, Any]]) -> list[PeerBudget]:
    """Per model, the newest call that ran the peer (benchmarks/run_device.py --peer), budget by budget."""
    budgets = []
    for model in sorted({r["model"] for r in records if r["stage"] == "peer"}):
        run = max(r["run"] for r in records if r["stage"] == "peer" and r["model"] == model)
        mine = [r for r in records if (r["run"], r["model"]) == (run, model)]
        plain = next(r for r in mine if r["recipe"] == "baseline-mb16x1")
        for budget in dict.fromkeys(r["memory_budget_gib"] for r in mine if r["stage"] == "peer"):
            project = next(r for r in mine if (r["recipe"], r["memory_budget_gib"]) == ("budget", budget))
            ways = [r for r in mine if r["stage"] == "peer" and r["memory_budget_gib"] == budget]
            peer = max(ways, key=lambda r: r["steady_reviews_per_s"])
            budgets.append(PeerBudget(model, run, budget, project, peer, plain))
    return budgets


def peer_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Budget by budget (peer_budgets): the project's fine-tune, the peer's fastest way within the budget, the plain
    stack (its one configuration, where it fits)."""
    rows = []
    for b in peer_budgets(records):
        gib, speed = b.plain["peak_vram_gib"], b.plain["steady_reviews_per_s"]
        fits = b.budget_gib is None or gib <= b.budget_gib
        plain_figure = f"{speed:.1f} ({gib:.1f} GiB)" if fits else f"needs {gib} GiB"
        to_plain = f"{b.project['steady_reviews_per_s'] / speed:.2f}x" if fits else "—"
        figures = [b.budget_gib or "whole GPU", b.run, figure(b.project), figure(b.peer), plain_figure]
        rows.append(dict(zip(PEER_COLUMNS, [b.model, *figures, f"{b.ratio:.2f}x", to_plain], strict=True)))
    return rows


def newest_ablation(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """The newest re-measured Table 3 per model, {model: {variant: record}}: the records of the newest call with an
    ablation-paper record for the model, their recipe without the ablation- prefix."""
    ablations = [r for r in records if r["stage"] == "finetune" and r["recipe"].startswith("ablation-")]
    newest: dict[str, dict[str, dict[str, Any]]] = {}
    for model in dict.fromkeys(r["model"] for r in ablations):
        runs = sorted({r["run"] for r in ablations if r["model"] == model and r["recipe"] == "ablation-paper"})
        if runs:
            mine = [r for r in ablations if r["model"] == model and r["run"] == runs[-1]]
            newest[model] = {r["recipe"].removeprefix("ablation-"): r for r in mine}
    return newest


def saving(variant: dict[str, Any], paper: dict[str, Any]) -> float:
    """The share of peak memory the paper's recipe saves against the variant without its technique."""
    return 1 - paper["peak_vram_gib"] / variant["peak_vram_gib"]


def seconds_per_step(record: dict[str, Any]) -> float:
    return record["wall_s"] / record["steps"]


def quality_claims(
    evaluate: dict[str, dict[str, Any]],
    intervals: dict[str, dict[str, tuple[float, float]]],
    random_weights: set[str],
    paper: dict[str, dict[str, Any]],
) -> list[Claim]:
    """Each fine-tuned accuracy and F1 the paper reports against ours with its 95% interval."""
    claims = []
    for key, metrics in evaluate.items():
        for metric in ("accuracy", "f1"):
            claimed = paper.get(key, {}).get(metric)
            if claimed is None:
                continue
            low, high = intervals[key][metric]
            measured = f"{metrics[metric]:.3f} (95% CI {low:.3f}-{high:.3f}, {metrics['reviews']} reviews)"
            name = f"{key} fine-tuned {metric} {claimed:g}"
            if key in random_weights:
                claims.append(Claim(name, measured, "not measurable on this run", "random weights"))
            elif low <= claimed <= high:
                claims.append(Claim(name, measured, "supported", f"{claimed:g} lies inside our interval"))
            else:
                side = "above" if claimed > high else "below"
                claims.append(Claim(name, measured, "contradicted", f"{claimed:g} lies {side} our interval"))
    return claims


def gap_claim(comparison: Comparison | None, claimed: float) -> list[Claim]:
    """DeepSeek more accurate than Llama-2 (by `claimed`, 0.07 in the paper), from the paired comparison."""
    if comparison is None:
        return []
    name = f"{comparison.challenger} beats {comparison.baseline} by {100 * claimed:.0f} accuracy points"
    measured = (
        f"{100 * comparison.difference:+.1f} points (95% CI {100 * comparison.low:+.1f} to "
        f"{100 * comparison.high:+.1f}), McNemar p = {comparison.p_value:.3g}"
    )
    if comparison.random_weights:
        return [Claim(name, measured, "not measurable on this run", "random weights")]
    if comparison.p_value >= 0.05:
        return [Claim(name, measured, "not supported at this test size", "the two cannot be told apart here")]
    if comparison.difference < 0:
        return [Claim(name, measured, "contradicted", "the other model is the more accurate")]
    inside = comparison.low <= claimed <= comparison.high
    why = f"ahead, and {100 * claimed:.0f} points {'lies inside' if inside else 'lies outside'} the interval"
    return [Claim(name, measured, "supported" if inside else "contradicted (size)", why)]


def memory_claims(ablation: dict[str, dict[str, dict[str, Any]]], finetune: dict[str, dict[str, Any]]) -> list[Claim]:
    """Llama-2's peak near 40 GB and its repeated OOM (paper's recipe), and Table 3's savings, from the
    re-measured ablation; this run's own peak beside them."""
    claims = []
    llama = ablation.get("llama", {}).get("paper")
    ours = finetune.get("llama", {})
    own = f"; this run: {ours.get('peak_vram_reserved_gib')} GiB reserved" if ours.get("peak_vram_reserved_gib") else ""
    name_peak, name_oom = "llama peaks near the A100's 40 GB", "llama runs out of memory repeatedly on 40 GB"
    if llama is None:
        why = "no re-measured Table 3 in benchmarks/records.jsonl (benchmarks/run_device.py --ablation)"
        claims += [
            Claim(name, f"not measured{own}", "not measurable on this run", why) for name in (name_peak, name_oom)
        ]
    else:
        peak = llama["peak_vram_gib"]
        measured = f"{peak:.1f} GiB reserved at the paper's recipe ({llama['run']}, {llama['gpu']}){own}"
        near = peak >= NEAR * A100_GIB
        claims.append(
            Claim(name_peak, measured, "supported" if near else "contradicted", f"40 GB = {A100_GIB:.1f} GiB")
        )
        claims.append(
            Claim(
                name_oom,
                measured,
                "supported" if peak > A100_GIB else "contradicted",
                f"the recipe as described needs {peak:.1f} of {A100_GIB:.1f} GiB; an OOM needs something the paper "
                "does not describe"
                if peak <= A100_GIB
                else "the recipe needs more than the A100 has",
            )
        )
    for model, variants in ablation.items():
        paper = variants.get("paper")
        for variant, (technique, claimed, span) in TABLE3.items():
            if paper is None or variant not in variants or (span is None and claimed == "not in Table 3"):
                continue
            saved = saving(variants[variant], paper)
            measured = (
                f"{saved:.0%} ({variants[variant]['peak_vram_gib']:.1f} -> {paper['peak_vram_gib']:.1f} GiB, "
                f"{model}, {paper['run']})"
            )
            name = f"{technique} saves {claimed}"
            if span is None:
                why = "the paper's figure is of attention memory alone; ours is the whole run's peak"
                claims.append(Claim(name, measured, "not measurable as stated", why))
            else:
                inside = span[0] - TOLERANCE <= saved <= span[1] + TOLERANCE
                off = f"{100 * TOLERANCE:.0f} points"
                why = f"within {off} of the paper's figure" if inside else f"more than {off} from the paper's figure"
                claims.append(Claim(name, measured, "supported" if inside else "contradicted", why))
    return claims


def time_claims(ablation: dict[str, dict[str, dict[str, Any]]], claimed: dict[str, tuple[float, int]]) -> list[Claim]:
    """Training times (`claimed`: {model: (hours, steps)}) against the re-measured paper recipe's seconds per step,
    scaled to an A100."""
    claims = []
    for model, (hours, steps) in claimed.items():
        name = f"{model}: {hours:g} h for {steps} steps"
        paper = ablation.get(model, {}).get("paper")
        if paper is None:
            why = "no re-measured paper recipe in benchmarks/records.jsonl"
            claims.append(Claim(name, "not measured", "not measurable on this run", why))
            continue
        per_step = seconds_per_step(paper)
        scaled_h = per_step * A100_SLOWER * steps / 3600
        measured = (
            f"{per_step:.1f} s/step at the paper's recipe ({paper['gpu']}); {steps} steps = "
            f"{per_step * steps / 3600:.2f} h, at most {scaled_h:.2f} h on an A100"
        )
        if scaled_h < hours / 2:
            claims.append(Claim(name, measured, "contradicted", f"even {A100_SLOWER:.1f}x slower it is under half"))
        else:
            claims.append(Claim(name, measured, "supported", "within a factor 2 once scaled to an A100"))
    return claims


def plateau_share(loss: pd.Series) -> float:
    """The share of the loss's whole drop (smoothed over a tenth of the run) that comes in its second half."""
    smooth = loss.rolling(max(1, len(loss) // 10), min_periods=1).mean().to_numpy()
    middle = len(smooth) // 2
    drop = smooth[0] - smooth[-1]
    return float((smooth[middle] - smooth[-1]) / drop) if drop > 0 else 0.0


def stability_claim(losses: dict[str, pd.Series], random_weights: set[str]) -> list[Claim]:
    """'DeepSeek's loss falls steadily; Llama-2's plateaus': the share of each drop that comes in the second half."""
    if not {"llama", "deepseek"} <= set(losses):
        return []
    name = "deepseek's loss falls steadily, llama's plateaus"
    shares = {key: plateau_share(losses[key]) for key in ("llama", "deepseek")}
    measured = ", ".join(f"{key}: {share:.0%} of its drop in the second half" for key, share in shares.items())
    if random_weights & set(losses):
        return [Claim(name, measured, "not measurable on this run", "random weights learn no language")]
    plateaus = {key: share < PLATEAU for key, share in shares.items()}
    verdict = "supported" if plateaus["llama"] and not plateaus["deepseek"] else "contradicted"
    return [Claim(name, measured, verdict, f"a plateau: under {PLATEAU:.0%} of the drop in the second half")]


def lora_claim(
    finetune: dict[str, dict[str, Any]], bases: dict[str, dict[str, Any]], r: int, shrunk: set[str]
) -> list[Claim]:
    """'LoRA on q, v and o limits the trainable parameters to less than 0.06%': r x (in + out) per adapted square
    projection of the base, beside this run's own share (its targets). Not measurable for a model whose
    architecture models.<key>.overrides shrank (`shrunk`)."""
    claims = []
    for key, metrics in finetune.items():
        name = f"{key}: LoRA trains less than 0.06% of the parameters"
        if key in shrunk:
            why = f"models.{key}.overrides shrank the architecture"
            claims.append(Claim(name, "not counted", "not measurable on this run", why))
            continue
        base = bases[key]
        hidden, layers = base["hidden_size"], base["num_hidden_layers"]
        paper_targets = 3 * layers * r * 2 * hidden  # q, v, o: hidden x hidden each
        share = paper_targets / metrics["total_parameters"]
        own = metrics["trainable_parameters"] / metrics["total_parameters"]
        measured = f"q, v, o at r={r}: {share:.3%}; this run's targets: {own:.3%}"
        verdict = "supported" if share < 0.0006 else "contradicted"
        claims.append(Claim(name, measured, verdict, "counted on the model's own architecture"))
    return claims


def claims_markdown(claims: list[Claim]) -> list[str]:
    rows = ["| the paper says | measured | verdict | why |", "| --- | --- | --- | --- |"]
    rows += [f"| {c.claim} | {c.measured} | **{c.verdict}** | {c.why} |" for c in claims]
    return rows


def table3_markdown(ablation: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """The re-measured Table 3: per model, the paper's recipe and each variant with one technique changed."""
    if not ablation:
        return ["No re-measured Table 3 in benchmarks/records.jsonl yet (benchmarks/run_device.py --ablation)."]
    rows = [
        "| model | variant | quantization | checkpointing | attention | micro-batch | peak GiB (reserved) | "
        "technique saves | s/step | GPU util % | run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, variants in ablation.items():
        paper = variants.get("paper")
        for variant, r in variants.items():
            saved = f"{saving(r, paper):.0%}" if paper and variant != "paper" else ""
            rows.append(
                f"| {model} | {variant} | {r['quantization']} | {r['gradient_checkpointing']} | {r['attention']} | "
                f"{r['micro_batch']} x {r['grad_accum']} | {r['peak_vram_gib']:.2f} | {saved} | "
                f"{seconds_per_step(r):.1f} | {r['gpu_util_pct']} | {r['run']} |"
            )
    return rows
