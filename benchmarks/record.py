"""Benchmark records: one raw device-call folder -> benchmarks/records.jsonl -> benchmarks/README.md.

    .venv/bin/python benchmarks/record.py [benchmarks/raw/2026-11-30-h200]

Reads what benchmarks/run_device.py (through benchmarks/device.sh) wrote for each model key: baseline_<key>.jsonl,
finetune_<key>_{default,paper,budget}.json, evaluate_<key>.json, timings_<key>.json, plus gpu.csv and versions.json.
Rewrites the records of that folder's date and GPU in records.jsonl (records of other calls stay), then regenerates
README.md from all of records.jsonl. Both files are written atomically.

MFU (model FLOPs utilization) of a project fine-tune row:
    mfu = tokens_per_s * 6 * total_parameters / PEAK_FLOPS
With LoRA the frozen weights get no weight gradients, so one token costs 2N (forward) + 2N (gradients of the
activations) = 4N FLOPs; gradient checkpointing runs the forward again, + 2N, hence 6N. N = total_parameters of the
finetune JSON (base weights + LoRA, embeddings included: a ~2% overcount); attention FLOPs are left out. Tokens are
real tokens (padding excluded), so this is the useful share of the GPU's peak, not what the kernels executed.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from duel.io import atomic_path

BENCH = Path(__file__).resolve().parent
RAW = BENCH / "raw" / "2026-11-30-h200"
# The H200's bf16 matrix rate as measured on this machine kind (8192^3 products, random data: 769-798 TFLOP/s);
# the datasheet's dense peak (989) is not reached by any real kernel, so MFU against it would understate less.
PEAK_FLOPS = 790e12
MAX_LENGTH = 512  # data.max_length of params.yaml; the finetune JSON does not record it
BUDGET_GIB = 16.0  # the device call's --budget-gib; the finetune JSON does not record it
PAPER_STEPS = 200  # the paper's optimizer steps
PAPER_TEST_REVIEWS = 25000  # the whole IMDB test split
RECIPES = {"default": "default", "paper": "paper", "budget": f"default-{BUDGET_GIB:g}gib"}


@dataclasses.dataclass(frozen=True)
class Record:
    """One measured configuration of one device call."""

    date: str
    gpu: str
    stage: str  # finetune | evaluate | duel
    model: str
    recipe: str  # default | paper | default-16gib | zero-shot | baseline-mb1x16 | baseline-mb16
    quantization: str  # nf4-dq | none
    memory_budget_gib: float | None
    micro_batch: int | None
    grad_accum: int | None
    max_length: int
    steps: int | None  # None for baseline rows: their wall_s is seconds per optimizer step
    wall_s: float
    reviews_per_s: float | None
    tokens_per_s: float | None  # real tokens, padding excluded
    peak_vram_gib: float | None  # torch.cuda.max_memory_reserved
    nvml_peak_gib: float | None
    energy_j_per_step: float | None
    mfu: float | None
    baseline_reviews_per_s: float | None  # the baseline's best nf4-dq configuration, same call, same model
    baseline_same_recipe_reviews_per_s: float | None  # paper rows: the baseline's micro-batch 1 x 16
    ratio_vs_baseline: float | None  # reviews_per_s / baseline_reviews_per_s
    versions: dict[str, str]
    note: str


def ratio(value: float | None, baseline: float | None) -> float | None:
    return round(value / baseline, 3) if value is not None and baseline else None


def read_baseline(path: Path) -> list[dict[str, Any]]:
    """One JSON line per configuration; '#' lines are the script's progress messages."""
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip() and not line.startswith("#")]


def baseline_records(rows: list[dict[str, Any]], model: str, common: dict[str, Any]) -> list[Record]:
    records = []
    for row in rows:
        # every baseline review is 512 random tokens, no padding: reviews/s = tokens/s / 512
        kind = f"micro-batch {row['micro_batch']} x {row['accum']}, {row['quant']} weights"
        checkpointing = "with" if row["grad_ckpt"] else "without"
        records.append(
            Record(
                **common,
                stage="finetune",
                model=model,
                recipe=f"baseline-mb{row['micro_batch']}" + (f"x{row['accum']}" if row["accum"] > 1 else ""),
                quantization="nf4-dq" if row["quant"] == "nf4-dq" else "none",
                memory_budget_gib=None,
                micro_batch=row["micro_batch"],
                grad_accum=row["accum"],
                max_length=row["seq"],
                steps=None,
                wall_s=row["step_s"],
                reviews_per_s=round(row["tokens_per_s"] / row["seq"], 3),
                tokens_per_s=row["tokens_per_s"],
                peak_vram_gib=row["peak_reserved_gib"],
                nvml_peak_gib=None,
                energy_j_per_step=None,
                mfu=None,
                baseline_reviews_per_s=None,
                baseline_same_recipe_reviews_per_s=None,
                ratio_vs_baseline=None,
                note=f"plain HF+PEFT+bitsandbytes baseline, {kind}, {checkpointing} gradient checkpointing, bf16 "
                f"compute; random tokens, {row['seq']} per review, causal-LM loss on every position; steps null: "
                "wall_s is seconds per optimizer step of 16 reviews, warm-up step excluded",
            )
        )
    return records


def finetune_record(raw: dict[str, Any], tag: str, baselines: list[Record], common: dict[str, Any]) -> Record:
    quantized = [b for b in baselines if b.quantization == "nf4-dq"]
    best = max(b.reviews_per_s for b in quantized)
    same = [
        b.reviews_per_s for b in quantized if b.micro_batch == raw["micro_batch"] and b.grad_accum == raw["grad_accum"]
    ]
    padded_per_review = raw["padded_tokens_per_s"] / raw["reviews_per_s"]
    note = (
        f"random weights; {raw['steps']} of the paper's {PAPER_STEPS} steps, the first (warm-up) step included in "
        f"wall_s; {raw['precision']}, {raw['attention']}; padding_share {raw['padding_share']}, "
        f"{padded_per_review:.1f} padded tokens per review"
    )
    if tag == "budget":
        note += f"; train.memory_budget_gib {BUDGET_GIB:g}, micro-batch {raw['micro_batch']} x {raw['grad_accum']}"
    return Record(
        **common,
        stage="finetune",
        model=raw["model"],
        recipe=RECIPES[tag],
        quantization=raw["quantization"] or "none",
        memory_budget_gib=BUDGET_GIB if tag == "budget" else None,
        micro_batch=raw["micro_batch"],
        grad_accum=raw["grad_accum"],
        max_length=MAX_LENGTH,
        steps=raw["steps"],
        wall_s=raw["train_time_s"],
        reviews_per_s=raw["reviews_per_s"],
        tokens_per_s=raw["tokens_per_s"],
        peak_vram_gib=raw["peak_vram_reserved_gib"],
        nvml_peak_gib=raw["nvml_peak_gib"],
        energy_j_per_step=raw["energy_j_per_step"],
        mfu=round(raw["tokens_per_s"] * 6 * raw["total_parameters"] / PEAK_FLOPS, 4),
        baseline_reviews_per_s=best,
        baseline_same_recipe_reviews_per_s=same[0] if tag == "paper" and same else None,
        ratio_vs_baseline=ratio(raw["reviews_per_s"], best),
        note=note,
    )


def evaluate_records(raw: dict[str, Any], model: str, quantization: str, common: dict[str, Any]) -> list[Record]:
    records = []
    for variant, m in raw[model].items():
        records.append(
            Record(
                **common,
                stage="evaluate",
                model=model,
                recipe="default" if variant == "finetuned" else "zero-shot",
                quantization=quantization,
                memory_budget_gib=None,
                micro_batch=None,
                grad_accum=None,
                max_length=MAX_LENGTH,
                steps=None,
                wall_s=m["eval_time_s"],
                reviews_per_s=m["reviews_per_s"],
                tokens_per_s=None,
                peak_vram_gib=m["peak_vram_reserved_gib"],
                nvml_peak_gib=m["nvml_peak_gib"],
                energy_j_per_step=None,
                mfu=None,
                baseline_reviews_per_s=None,
                baseline_same_recipe_reviews_per_s=None,
                ratio_vs_baseline=None,
                note=f"{variant}: {m['reviews']} test reviews, {m['energy_j']} J "
                f"({m['energy_j'] / m['reviews']:.1f} J/review), GPU util {m['gpu_util_mean_pct']}%; "
                "random weights, accuracy meaningless",
            )
        )
    return records


def duel_record(timings: dict[str, Any], default: Record, test_reviews: int, common: dict[str, Any]) -> Record:
    stages = " + ".join(f"{name} {timings[name]:.1f}" for name in ("download", "tokenize", "finetune", "evaluate"))
    note = (
        f"{stages} s; {default.steps} steps + {test_reviews} test reviews, not the paper-scale "
        f"{PAPER_STEPS} steps + {PAPER_TEST_REVIEWS} test reviews"
    )
    if "note" in timings:
        note += f"; {timings['note']}"
    return dataclasses.replace(
        default,
        stage="duel",
        wall_s=round(timings["duel_wall_s"], 1),
        reviews_per_s=None,
        tokens_per_s=None,
        peak_vram_gib=None,
        nvml_peak_gib=None,
        energy_j_per_step=None,
        mfu=None,
        baseline_reviews_per_s=None,
        baseline_same_recipe_reviews_per_s=None,
        ratio_vs_baseline=None,
        note=note,
    )


def build_records(raw: Path) -> list[Record]:
    """Every measured configuration in one raw folder (named <date>-<gpu>)."""
    date = datetime.date.fromisoformat(raw.name[:10]).isoformat()
    with (raw / "gpu.csv").open() as f:
        gpu = next(csv.DictReader(f, skipinitialspace=True))["name"]
    common = {"date": date, "gpu": gpu, "versions": json.loads((raw / "versions.json").read_text())}
    records: list[Record] = []
    for path in sorted(raw.glob("finetune_*_default.json")):
        model = path.name.split("_")[1]
        baselines = baseline_records(read_baseline(raw / f"baseline_{model}.jsonl"), model, common)
        finetunes = [
            finetune_record(json.loads(p.read_text()), tag, baselines, common)
            for tag in RECIPES
            if (p := raw / f"finetune_{model}_{tag}.json").exists()
        ]
        evaluate = json.loads((raw / f"evaluate_{model}.json").read_text())
        default = finetunes[0]
        test_reviews = evaluate[model]["finetuned"]["reviews"]
        timings = json.loads((raw / f"timings_{model}.json").read_text())
        records += baselines + finetunes + evaluate_records(evaluate, model, default.quantization, common)
        records.append(duel_record(timings, default, test_reviews, common))
    return records


def read_records(path: Path) -> list[Record]:
    """records.jsonl; an unknown or missing field fails here."""
    return [Record(**json.loads(line)) for line in path.read_text().splitlines()] if path.exists() else []


def merge_records(path: Path, new: list[Record]) -> list[Record]:
    """records.jsonl without the records of the same date and GPU, then the new ones."""
    old = read_records(path)
    calls = {(r.date, r.gpu) for r in new}
    return [r for r in old if (r.date, r.gpu) not in calls] + new


def write_records(path: Path, records: list[Record]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in records))


def fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def table_row(r: Record) -> str:
    """The README row of one record (the test checks one per record)."""
    if r.stage == "finetune":
        wall = fmt(r.wall_s, 2) + (" /step" if r.steps is None else "")
        return (
            f"| {r.recipe} | {r.quantization} | {r.micro_batch} x {r.grad_accum} | {r.steps or '—'} | {wall} | "
            f"{fmt(r.reviews_per_s, 3)} | {fmt(r.tokens_per_s, 1)} | {fmt(r.peak_vram_gib)} | {fmt(r.nvml_peak_gib)} | "
            f"{fmt(r.energy_j_per_step, 1)} | {fmt(None if r.mfu is None else 100 * r.mfu, 1)} | "
            f"{fmt(r.baseline_reviews_per_s, 3)} | {fmt(r.ratio_vs_baseline, 3)} |"
        )
    if r.stage == "evaluate":
        return (
            f"| {r.model} | {r.recipe} | {r.quantization} | {fmt(r.wall_s)} | {fmt(r.reviews_per_s)} | "
            f"{fmt(r.peak_vram_gib)} | {fmt(r.nvml_peak_gib)} | {r.note} |"
        )
    return f"| {r.model} | {r.recipe} | {r.micro_batch} x {r.grad_accum} | {r.steps} | {fmt(r.wall_s, 1)} | {r.note} |"


FINETUNE_HEADER = (
    "| recipe | quantization | micro-batch x accum | steps | wall s | reviews/s | real tokens/s | "
    "peak VRAM (torch reserved) GiB | NVML peak GiB | energy J/step | MFU % | baseline reviews/s | ratio |\n"
    + "|---" * 13
    + "|"
)
EVALUATE_HEADER = (
    "| model | variant | quantization | wall s | reviews/s | peak VRAM (torch reserved) GiB | NVML peak GiB | note |\n"
    + "|---" * 8
    + "|"
)
DUEL_HEADER = "| model | recipe | micro-batch x accum | steps | wall s | stages |\n" + "|---" * 6 + "|"

MEASURED = """\
## How the numbers were measured

One device call per model: `bash benchmarks/device.sh <key> --paper-steps 4 --budget-gib 16`, with `.whl` (the
wheels) and `.carry` (the hub cache, IMDB and the baseline script) carried to the GPU machine; see the header of
`benchmarks/run_device.py`. The call first runs the plain HF + PEFT + bitsandbytes QLoRA baseline
(`../shared/bench/hf_qlora_baseline.py`), then the project's stages with `benchmarks/profiles/h200.yaml`
(download, tokenize, finetune with the default recipe, evaluate), then finetune again with the paper's recipe
(`profiles/paper.yaml`) for 4 steps and with `train.memory_budget_gib 16`. The models are the full 7B
architectures with random weights: memory, speed and energy are real, accuracy is meaningless.
"""

DEFINITIONS = f"""\
## Definitions

- **peak VRAM (torch reserved)**, `peak_vram_gib`: `torch.cuda.max_memory_reserved`, reset before the timed run.
- **NVML peak**, `nvml_peak_gib`: NVML device memory used, peak sampled every 50 ms; includes the CUDA context.
- **energy J/step**: from NVML's total energy counter over the timed run, divided by the optimizer steps.
- **tokens**: real tokens, padding excluded. The baseline's reviews are 512 random tokens with no padding, so its
  tokens are all real and its reviews/s = tokens/s / 512.
- **MFU**: real tokens/s x 6 x total parameters / {PEAK_FLOPS / 1e12:.0f} TFLOPS (the measured bf16 matrix rate).
  6N per token: LoRA leaves the frozen weights without weight gradients (forward 2N + activation gradients 2N),
  and gradient checkpointing repeats the forward (+2N). Attention FLOPs are left out.
- **baseline**: `../shared/bench/hf_qlora_baseline.py`, measured minutes before in the same device call, on the same
  architecture; baseline reviews/s of a project row = the best nf4-dq baseline configuration; ratio = reviews/s /
  baseline reviews/s. Baseline rows give seconds per optimizer step (16 reviews) as wall s, warm-up step excluded.
"""


def find(records: list[Record], stage: str, recipe: str) -> Record | None:
    return next((r for r in records if r.stage == stage and r.recipe == recipe), None)


def findings(records: list[Record]) -> list[str]:
    """What the numbers of one model in one call say, computed from them."""
    lines = []
    default, paper = find(records, "finetune", "default"), find(records, "finetune", "paper")
    budget = find(records, "finetune", RECIPES["budget"])
    quantized = [r for r in records if r.recipe.startswith("baseline") and r.quantization == "nf4-dq"]
    unquantized = [r for r in records if r.recipe.startswith("baseline") and r.quantization == "none"]
    model = records[0].model
    if default:
        best = max(quantized, key=lambda r: r.reviews_per_s or 0)
        real_per_review = default.tokens_per_s / default.reviews_per_s
        lines.append(
            f"- {model}, default recipe: {default.reviews_per_s} reviews/s, {default.ratio_vs_baseline}x the "
            f"baseline's best quantized configuration ({best.recipe}, {best.reviews_per_s} reviews/s), with "
            f"{default.peak_vram_gib} GiB torch reserved peak against the baseline's {best.peak_vram_gib} GiB; "
            f"MFU {100 * default.mfu:.1f}%."
        )
        lines.append(
            f"- {model}, padding: the default recipe fed {real_per_review:.0f} real tokens per review, so "
            f"{1 - real_per_review / default.max_length:.0%} of the {default.max_length} tokens per review were "
            "padding: an optimizer step's 16 random reviews are one micro-batch, padded to its longest, and the "
            "longest of 16 IMDB reviews nearly always reaches the cap (the record's note gives the measured "
            "padding_share), so the gain over the baseline does not come from padding."
        )
    if paper and paper.baseline_same_recipe_reviews_per_s:
        lines.append(
            f"- {model}, paper recipe (micro-batch 1 x 16, pad to 512, fp16, {paper.steps} steps): "
            f"{paper.reviews_per_s} reviews/s, "
            f"{ratio(paper.reviews_per_s, paper.baseline_same_recipe_reviews_per_s)}x the baseline's same "
            f"configuration ({paper.baseline_same_recipe_reviews_per_s} reviews/s); MFU {100 * paper.mfu:.1f}%, "
            f"{paper.energy_j_per_step} J per step against the default recipe's "
            f"{default.energy_j_per_step if default else '—'}."
        )
    if budget and default:
        verdict = "under" if budget.peak_vram_gib < budget.memory_budget_gib else "over"
        lines.append(
            f"- {model}, {budget.memory_budget_gib:g} GiB budget: micro-batch {budget.micro_batch} x "
            f"{budget.grad_accum}, torch reserved peak {budget.peak_vram_gib} GiB ({verdict} the budget; default "
            f"recipe: {default.peak_vram_gib} GiB), NVML peak {budget.nvml_peak_gib} GiB including the CUDA context; "
            f"{budget.reviews_per_s} reviews/s against the default's {default.reviews_per_s}."
        )
    for r in unquantized:
        lines.append(
            f"- {model}, not shown by the ratio: the baseline without quantization ({r.recipe}, bf16 weights) runs "
            f"{r.reviews_per_s} reviews/s in {r.peak_vram_gib} GiB; the ratios compare quantized runs only."
        )
    return lines


def render_readme(records: list[Record]) -> str:
    parts = [
        "# Benchmarks\n",
        "Generated by `python benchmarks/record.py` from records.jsonl; do not edit by hand.\n",
        MEASURED,
    ]
    for date, gpu in sorted({(r.date, r.gpu) for r in records}, reverse=True):
        call = [r for r in records if (r.date, r.gpu) == (date, gpu)]
        models = list(dict.fromkeys(r.model for r in call))
        versions = ", ".join(f"{k} {v}" for k, v in call[0].versions.items())
        parts.append(f"## {date}, {gpu}\n\n{versions}.\n")
        for model in models:
            rows = [table_row(r) for r in call if r.model == model and r.stage == "finetune"]
            parts.append(f"### Fine-tune, {model}\n\n{FINETUNE_HEADER}\n" + "\n".join(rows) + "\n")
        rows = [table_row(r) for r in call if r.stage == "evaluate"]
        parts.append("### Evaluate\n\n" + EVALUATE_HEADER + "\n" + "\n".join(rows) + "\n")
        rows = [table_row(r) for r in call if r.stage == "duel"]
        parts.append(
            "### Duel (download + tokenize + finetune + evaluate)\n\n" + DUEL_HEADER + "\n" + "\n".join(rows) + "\n"
        )
        shows = [line for model in models for line in findings([r for r in call if r.model == model])]
        evaluations = {(r.model, r.recipe): r for r in call if r.stage == "evaluate"}
        for model in models:
            tuned, zero = evaluations.get((model, "default")), evaluations.get((model, "zero-shot"))
            if tuned and zero:
                shows.append(
                    f"- {model}, evaluate: with the LoRA adapter {tuned.reviews_per_s} reviews/s, without it "
                    f"{zero.reviews_per_s} ({ratio(zero.reviews_per_s, tuned.reviews_per_s)}x); the finetuned "
                    "variant runs first in the process, so its time includes the warm-up, and the zero-shot memory "
                    "peaks repeat the finetuned ones because the allocator keeps its cache between the two."
                )
        parts.append(
            "### What this shows / what it does not\n\n"
            + "\n".join(shows)
            + "\n- Not shown: accuracy (random weights); the paper-scale duel (200 steps, 25,000 test reviews): the "
            "duel rows are 30 steps + 1,000 test reviews; run-to-run variance (one run per configuration). The "
            "baseline trains a causal-LM loss on all 512 positions with full-vocabulary logits and excludes its "
            "warm-up step; the project computes only the answer logits and its wall time includes the first step, "
            "which weighs most in the 4-step paper runs.\n"
        )
    parts.append(DEFINITIONS)
    return "\n".join(parts)


def main() -> None:
    raw = Path(sys.argv[1]) if len(sys.argv) > 1 else RAW
    records_path = BENCH / "records.jsonl"
    write_records(records_path, merge_records(records_path, build_records(raw)))
    records = read_records(records_path)  # the README shows what records.jsonl holds, nothing else
    with atomic_path(BENCH / "README.md") as tmp:
        tmp.write_text(render_readme(records))
    print(f"{len(records)} records -> {BENCH / 'records.jsonl'}, {BENCH / 'README.md'}")


if __name__ == "__main__":
    main()
