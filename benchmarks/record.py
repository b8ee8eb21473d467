"""Benchmark records: raw device-call folders -> benchmarks/records.jsonl -> benchmarks/README.md.

    .venv/bin/python benchmarks/record.py [benchmarks/raw/<run> ...]   (no argument: every call folder under raw/)

A call folder holds gpu.csv and versions.json (written by benchmarks/device.sh) and the results in one of two formats:
- session 1 (benchmarks/raw/2026-11-30-h200): baseline_<key>.jsonl, finetune_<key>_{default,paper,budget}.json,
  evaluate_<key>.json, timings_<key>.json;
- benchmarks/run_device.py (session 2 on): results.jsonl, one line per result ({"kind", "model", "tag", "data"}),
  and log.txt, whose lines `==== <tag>: exit N in S s` time every stage process; at the call folder's top when the
  call ran on one GPU, in <key>/ when --parallel ran one model per GPU.
A record's `run` is its call folder relative to benchmarks/raw. The records of each run given are replaced in
records.jsonl (records of other runs stay), then README.md is regenerated from all of records.jsonl, with the
composed duel estimate computed from the records. Both files are written atomically.

MFU (model FLOPs utilization) of a project fine-tune row:
    mfu = tokens_per_s * flops_per_token / PEAK_FLOPS,  flops_per_token = 6N with gradient checkpointing, 4N without
With LoRA the frozen weights get no weight gradients, so one token costs 2N (forward) + 2N (gradients of the
activations) = 4N FLOPs; gradient checkpointing runs the forward again, + 2N, hence 6N. N = total_parameters of the
finetune JSON (base weights + LoRA, embeddings included: a ~2% overcount); attention FLOPs are left out. Tokens are
real tokens (padding excluded), so this is the useful share of the GPU's peak, not what the kernels executed.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import itertools
import json
import re
import sys
from pathlib import Path
from typing import Any

from duel.io import atomic_path

BENCH = Path(__file__).resolve().parent
RAW_ROOT = BENCH / "raw"
# The H200's bf16 matrix rate as measured on this machine kind (8192^3 products, random data: 769-798 TFLOP/s);
# the datasheet's dense peak (989) is not reached by any real kernel, so MFU against it would understate less.
PEAK_FLOPS = 790e12
MAX_LENGTH = 512  # data.max_length of params.yaml; the finetune JSON does not record it
PAPER_STEPS = 200  # the paper's optimizer steps
SWEEP_STEPS = 4  # benchmarks/profile_step.py --sweep-steps, as the runner calls it
# Its first version, before Liger: no kernels field, and each variant stepped on to the next batches.
SWEEP_FIRST_VERSION = {"2026-11-30-h200-session3/call1"}
PAPER_TEST_REVIEWS = 25000  # the whole IMDB test split
# What session 1's finetune JSON did not record, from its params.yaml and its device call (--budget-gib 16).
SESSION1_TRAIN = {"gradient_checkpointing": True, "padding": "longest"}
SESSION1_PAPER_PADDING = "max_length"  # profiles/paper.yaml
SESSION1_BUDGET_GIB = 16.0
KERNELS_BEFORE_SESSION3 = "none"  # train.kernels (Liger) came in session 3; earlier metrics do not name it
# The targets.
TARGET_FINETUNE_RATIO = 3.0  # default recipe, reviews/s over the baseline's
TARGET_BUDGET_GIB = 16.0
TARGET_BUDGET_RATIO = 2.0  # under a 16 GiB budget
TARGET_EVAL_REVIEWS_PER_S = 100.0
JUDGED_EVAL_REVIEWS = 3000  # fewer test reviews than this: the stage's rate is mostly loading and warm-up
TARGET_DUEL_S = 15 * 60  # both models: load, 200 steps, all 25,000 test reviews

# What the raw folders do not say: how each call was run and how it ended (from the session's notes and the logs).
CALLS = {
    "2026-11-30-h200": (
        "Session 1: one device call per model, `bash benchmarks/device.sh <key> --paper-steps 4 --budget-gib 16`; "
        "every stage ended (exit 0)."
    ),
    "2026-11-30-h200-session2/call2": (
        "Session 2, one GPU, models one after another. Only llama's results came back: its log ends with "
        "`finetune_llama_default: exit 0`, and the call was cut at the 600 s limit while the 25,000-review "
        "evaluate ran (this runner version logged a stage only once it ended, so the log cannot show the cut "
        "stage). No evaluate, timings or deepseek results."
    ),
    "2026-11-30-h200-session2/call3": (
        "Session 2, `--parallel`: llama on GPU 0 and deepseek on GPU 1 of one host at the same time, each with its "
        "own baseline on its own GPU in this call. Both logs end with `finetune_<key>_default: exit 0`; the call "
        "was cut at the 600 s limit during the 25,000-review evaluate, so there are no evaluate or timings results."
    ),
    "2026-11-30-h200-session2/call4": (
        "Session 2, `--parallel --no-default --test-size 3000 --budget-gib 16 --budget-steps 20`: llama on GPU 0 "
        "and deepseek on GPU 1 at the same time; per model download, tokenize, the budget fine-tune (20 steps, "
        "train.memory_budget_gib 16), evaluate on 3,000 test reviews with the adapter of that 20-step budget run, "
        "then the baseline on the same GPU. Every stage ended (exit 0). The runner's timings line ('duel') adds "
        "download + tokenize + evaluate only: no 200-step fine-tune and 3,000 reviews, so it is not a duel and "
        "gives no duel record."
    ),
    "2026-11-30-h200-session3/call1": (
        "Session 3, `--parallel --no-default --test-size 3000 --budget-gib 16 --budget-steps 30 --oom-gib 8 "
        "--profile-step --gpu-tests`, before Liger and before checkpointing was sized to the budget (all layers "
        "checkpointed under 16 GiB). Every stage ended (exit 0), but llama's results.jsonl did not come back (a "
        "device call returns at most 8 files): its numbers are only in llama/log.txt (budget run 18.331 reviews/s, "
        "baseline step 1.557 s = 10.28 reviews/s, 1.78x; evaluate 99.21 reviews/s on 3,000; the OOM back-off at "
        "8 GiB: `train: out of GPU memory at step 1; going on from step 0 with gradient checkpointing on`; "
        "`5 passed` GPU tests) and have no records. The sweep here is the first version: each variant stepped on to "
        "the next batches."
    ),
    "2026-11-30-h200-session3/call2": (
        "Session 3, `--parallel --baseline-last --test-size 3000 --budget-gib 16 --budget-steps 30 --profile-step "
        "--gpu-tests`: llama on GPU 0 and deepseek on GPU 1 of one host at the same time. Per model download, "
        "tokenize, the profile and the sweep (plain kernels, then Liger on the same model), the 200-step default "
        "fine-tune, evaluate on 3,000 reviews, the baseline, the 16 GiB budget run (30 steps); then the GPU tests "
        "(`6 passed`, the new Liger test among them) on GPU 0, at the same time as deepseek's budget run. Every "
        "stage ended (exit 0)."
    ),
    "2026-11-30-h200-session3/call3": (
        "Session 3, `--parallel --baseline-last --budget-gib 0`: the paper-scale duel, llama on GPU 0 and deepseek on "
        "GPU 1 of one host at the same time, each chain timed stage by stage (download, tokenize, 200-step default "
        "fine-tune, evaluate of all 25,000 test reviews), then each model's baseline. Every stage ended (exit 0)."
    ),
    "2026-11-30-h200-session3/call4": (
        "Session 3, the single-GPU machine kind (16 CPU cores), llama only: `llama --baseline-last --test-size 500 "
        "--budget-gib 16 --budget-steps 30`, called with a 330 s limit (what was left of the session's device "
        "time). The default fine-tune, evaluate (500 reviews, so its rate is mostly warm-up) and the baseline ended "
        "(exit 0); the budget run was cut by the limit and has no record."
    ),
    "2026-11-30-h200-session4/call1": (
        "Session 4, `--parallel --compiled --test-size 1000 --budget-gib 16 --budget-steps 30`: llama on GPU 0 and "
        "deepseek on GPU 1 of one host at the same time; per model the baseline, download, tokenize, the 200-step "
        "default fine-tune (Liger, SDPA), evaluate on 1,000 reviews, then the default again with train.compile "
        "(kernels none, a cold inductor cache). The call was cut at the 600 s limit during the compiled runs, at "
        "step 194 of 200 for llama and 192 for deepseek: they have no records. Their progress bars in log.txt show "
        "the compile: the first step took 105.5 s (llama) and 116.3 s (deepseek); the steps after it took 0.49 s "
        "each (llama, steps 2-194 in 94 s: 33 reviews/s) and 0.47 s (deepseek, steps 2-192 in 89 s: 34 reviews/s), "
        "against 0.66 and 0.62 s a step (24.1 and 25.8 reviews/s, its first step included) for this call's eager "
        "default. The budget runs did not start."
    ),
    "2026-11-30-h200-session4/call2": (
        "Session 4, `--parallel --profile-step --sweep-kernels liger --test-size 1000 --budget-gib 16 "
        "--budget-steps 30`, after `pytest -m gpu -k varlen` passed (1 passed): llama on GPU 0 and deepseek on GPU 1 "
        "at the same time. Per model the baseline, download, tokenize, the sweep (Liger; varlen attention, and "
        "SDPA's masked attention as variants), the 200-step default (Liger, varlen), evaluate on 1,000 reviews, the "
        "16 GiB budget run (30 steps; auto then checkpointed every layer). Every stage ended (exit 0)."
    ),
    "2026-11-30-h200-session4/call3": (
        "Session 4, `--parallel --gpu-tests --test-size 1000 --budget-gib 16 --budget-steps 50`: llama on GPU 0 and "
        "deepseek on GPU 1 at the same time. Per model the baseline, download, tokenize, the 200-step default "
        "(Liger, varlen), evaluate on 1,000 reviews, the 16 GiB budget run (50 steps; auto checkpointing the "
        "fewest layers that fit: 28 of 32, 26 of 30). Every stage ended (exit 0). The GPU tests then ran on GPU 0: "
        "`2 failed, 6 passed`; the compile and varlen tests failed inside dynamo on Liger's RMSNorm, which the Liger "
        "test, run before them, had left in place of transformers' class for every later model (fixed in the tests "
        "afterwards, not run again: the device time was spent). The varlen test had passed alone in call 2."
    ),
}


UNDESCRIBED = "The runner's command line is the first line (kind call) of the folder's results.jsonl."


@dataclasses.dataclass(frozen=True)
class Record:
    """One measured configuration of one device call."""

    date: str
    gpu: str
    run: str  # the call folder relative to benchmarks/raw: 2026-11-30-h200, 2026-11-30-h200-session2/call3
    stage: str  # finetune | evaluate | duel | sweep (benchmarks/profile_step.py: a few steps of one variant)
    model: str
    recipe: str  # default | paper | default-16gib | zero-shot | baseline-mb1x16 | baseline-mb16
    quantization: str  # nf4-dq | none
    memory_budget_gib: float | None
    gradient_checkpointing: bool | None  # as resolved by the run (auto: off on the H200); None for evaluate rows
    checkpointed_layers: int | None  # decoder layers recomputed (session 3 on; None where not recorded)
    kernels: str | None  # liger | none: fused RMSNorm/RoPE/SwiGLU (train.kernels, session 3 on)
    attention: str | None  # sdpa | varlen | flash_attention_2 as the run resolved it; None where not recorded
    micro_batch: int | None
    grad_accum: int | None
    max_length: int
    steps: int | None  # None for baseline rows: their wall_s is seconds per optimizer step
    wall_s: float
    reviews_per_s: float | None
    tokens_per_s: float | None  # real tokens, padding excluded
    padding_share: float | None  # padding's share of the token slots trained on (1 - real / padded tokens)
    peak_vram_gib: float | None  # torch.cuda.max_memory_reserved
    nvml_peak_gib: float | None
    energy_j_per_step: float | None
    mfu: float | None
    baseline_reviews_per_s: float | None  # the baseline's best nf4-dq configuration, same call, same GPU, same model
    baseline_same_recipe_reviews_per_s: float | None  # paper rows: the baseline's micro-batch 1 x 16
    ratio_vs_baseline: float | None  # reviews_per_s / baseline_reviews_per_s
    call_stages_s: dict[str, float] | None  # this model's stage processes in this call, seconds as log.txt gives them
    versions: dict[str, str]
    note: str

    def __post_init__(self) -> None:
        if self.stage not in ("finetune", "evaluate", "duel", "sweep"):
            raise ValueError(f"stage {self.stage!r}: finetune, evaluate, duel or sweep")


def ratio(value: float | None, baseline: float | None) -> float | None:
    return round(value / baseline, 3) if value is not None and baseline else None


def read_baseline(path: Path) -> list[dict[str, Any]]:
    """One JSON line per configuration; '#' lines are the script's progress messages."""
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip() and not line.startswith("#")]


def logged_stages(log: Path, model: str) -> dict[str, float]:
    """Seconds of each of this model's stage processes, from the runner's `==== <tag>: exit N in S s` lines; the model
    key is dropped from the tag (finetune_llama_default -> finetune_default)."""
    stages = {}
    for tag, code, seconds in re.findall(r"^==== (\S+): exit (-?\d+) in ([\d.]+) s$", log.read_text(), re.MULTILINE):
        parts = tag.split("_")
        if model not in parts:
            continue
        if code != "0":
            raise ValueError(f"{log}: {tag} exited {code}; record.py has no row for a failed stage")
        stages["_".join(p for p in parts if p != model)] = float(seconds)
    return stages


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
                gradient_checkpointing=row["grad_ckpt"],
                checkpointed_layers=None,
                kernels="none",
                attention="sdpa",  # the baseline script's attn_implementation
                micro_batch=row["micro_batch"],
                grad_accum=row["accum"],
                max_length=row["seq"],
                steps=None,
                wall_s=row["step_s"],
                reviews_per_s=round(row["tokens_per_s"] / row["seq"], 3),
                tokens_per_s=row["tokens_per_s"],
                padding_share=0.0,
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
    if tag not in ("default", "budget", "paper", "oom", "compiled", "budget-compiled"):
        raise ValueError(
            f"finetune tag {tag!r}: record.py knows default, budget, paper, oom, compiled and budget-compiled"
        )
    compiled = "-compiled" if raw.get("compiled") else ""
    quantized = [b for b in baselines if b.quantization == "nf4-dq"]
    best = max(b.reviews_per_s for b in quantized)
    same = [
        b.reviews_per_s for b in quantized if b.micro_batch == raw["micro_batch"] and b.grad_accum == raw["grad_accum"]
    ]
    budget = raw["memory_budget_gib"]
    checkpointing = raw["gradient_checkpointing"]
    flops_per_token = (6 if checkpointing else 4) * raw["total_parameters"]  # see the module docstring
    padded_per_review = raw["padded_tokens_per_s"] / raw["reviews_per_s"]
    note = (
        f"random weights; {raw['steps']} of the paper's {PAPER_STEPS} steps, the first (warm-up) step included in "
        f"wall_s; {raw['precision']}, {raw['attention']}, kernels {raw.get('kernels', KERNELS_BEFORE_SESSION3)}, "
        f"padding {raw['padding']}, gradient checkpointing {'on' if checkpointing else 'off'}"
        + (f" in {raw['checkpointed_layers']} layers" if checkpointing and "checkpointed_layers" in raw else "")
        + ("; layers compiled (train.compile), the cold compile included in wall_s" if compiled else "")
        + f"; padding_share {raw['padding_share']}, {padded_per_review:.1f} token "
        "slots per review"
    )
    if budget is not None:
        note += f"; train.memory_budget_gib {budget:g}, micro-batch {raw['micro_batch']} x {raw['grad_accum']}"
    return Record(
        **common,
        stage="finetune",
        model=raw["model"],
        recipe="paper"
        if tag == "paper"
        else f"oom-backoff-{budget:g}gib"
        if tag == "oom"
        else f"default{compiled}"
        if budget is None
        else f"default-{budget:g}gib{compiled}",
        quantization=raw["quantization"] or "none",
        memory_budget_gib=budget,
        gradient_checkpointing=checkpointing,
        checkpointed_layers=raw.get("checkpointed_layers"),
        kernels=raw.get("kernels", KERNELS_BEFORE_SESSION3),
        attention=raw["attention"],
        micro_batch=raw["micro_batch"],
        grad_accum=raw["grad_accum"],
        max_length=MAX_LENGTH,
        steps=raw["steps"],
        wall_s=raw["train_time_s"],
        reviews_per_s=raw["reviews_per_s"],
        tokens_per_s=raw["tokens_per_s"],
        padding_share=raw["padding_share"],
        peak_vram_gib=raw["peak_vram_reserved_gib"],
        nvml_peak_gib=raw["nvml_peak_gib"],
        energy_j_per_step=raw["energy_j_per_step"],
        mfu=round(raw["tokens_per_s"] * flops_per_token / PEAK_FLOPS, 4),
        baseline_reviews_per_s=best,
        baseline_same_recipe_reviews_per_s=same[0] if tag == "paper" and same else None,
        ratio_vs_baseline=ratio(raw["reviews_per_s"], best),
        note=note,
    )


def evaluate_records(raw: dict[str, Any], model: str, adapter: Record, common: dict[str, Any]) -> list[Record]:
    """One record per variant; `adapter` is the fine-tune whose adapter the stage loaded (the call's last before it)."""
    records = []
    for variant, m in raw[model].items():
        trained = f", adapter of this call's {adapter.recipe} fine-tune ({adapter.steps} steps)"
        records.append(
            Record(
                **common,
                stage="evaluate",
                model=model,
                recipe="default" if variant == "finetuned" else "zero-shot",
                quantization=adapter.quantization,
                memory_budget_gib=None,
                gradient_checkpointing=None,
                checkpointed_layers=None,
                kernels=m.get("kernels", KERNELS_BEFORE_SESSION3),
                attention=None,  # evaluate's metrics do not name it
                micro_batch=None,
                grad_accum=None,
                max_length=MAX_LENGTH,
                steps=None,
                wall_s=m["eval_time_s"],
                reviews_per_s=m["reviews_per_s"],
                tokens_per_s=None,
                padding_share=None,
                peak_vram_gib=m["peak_vram_reserved_gib"],
                nvml_peak_gib=m["nvml_peak_gib"],
                energy_j_per_step=None,
                mfu=None,
                baseline_reviews_per_s=None,
                baseline_same_recipe_reviews_per_s=None,
                ratio_vs_baseline=None,
                note=f"{variant}: {m['reviews']} test reviews{trained if variant == 'finetuned' else ''}; "
                f"{m['energy_j']} J ({m['energy_j'] / m['reviews']:.1f} J/review), GPU util "
                f"{m['gpu_util_mean_pct']}%; wall_s is the scoring alone; random weights, accuracy meaningless",
            )
        )
    return records


def sweep_record(raw: dict[str, Any], model: str, baselines: list[Record], common: dict[str, Any]) -> Record:
    """One variant of benchmarks/profile_step.py's sweep: a few optimizer steps of the default recipe's setup with one
    execution choice changed (row length, micro-batch, checkpointed layers, kernels), on the same batches."""
    best = max(b.reviews_per_s for b in baselines if b.quantization == "nf4-dq")
    checkpointed = raw["checkpointed_layers"]
    first_version = common["run"] in SWEEP_FIRST_VERSION
    kernels = "none" if first_version else raw["kernels"]
    attention = raw.get("attention", "sdpa")  # session 3's sweep rows do not name it: SDPA then
    batches = (
        "each variant on the next batches (this first version of the sweep), so the variants' reviews differ"
        if first_version
        else "the same batches for every variant"
    )
    return Record(
        **common,
        stage="sweep",
        model=model,
        recipe=f"{kernels}/{raw['variant']}",
        quantization="nf4-dq",
        memory_budget_gib=None,
        gradient_checkpointing=checkpointed > 0,
        checkpointed_layers=checkpointed,
        kernels=kernels,
        attention=attention,
        micro_batch=raw["micro_batch"],
        grad_accum=16 // raw["micro_batch"],
        max_length=MAX_LENGTH,
        steps=SWEEP_STEPS,
        wall_s=raw["s_per_step"],
        reviews_per_s=raw["reviews_per_s"],
        tokens_per_s=raw["tokens_per_s"],
        padding_share=None,
        peak_vram_gib=raw["peak_reserved_gib"],
        nvml_peak_gib=None,
        energy_j_per_step=None,
        mfu=None,
        baseline_reviews_per_s=best,
        baseline_same_recipe_reviews_per_s=None,
        ratio_vs_baseline=ratio(raw["reviews_per_s"], best),
        note=(
            f"layers compiled: {raw['compile_s']} s to compile (two steps included), not in wall_s; "
            if "compile_s" in raw
            else ""
        )
        + f"attention {attention}, rows of {raw['row_tokens']} tokens, {checkpointed} of "
        f"{raw['layers']} layers checkpointed; peak "
        f"allocated {raw['peak_allocated_gib']} GiB; wall_s is seconds per step over {SWEEP_STEPS} steps after a "
        f"warm-up step, {batches}, outside the Trainer (no logging or telemetry)",
    )


def duel_record(timings: dict[str, Any], default: Record, test_reviews: int) -> Record:
    """The runner's timings of download + tokenize + finetune (default recipe) + evaluate, run back to back."""
    names = [name for name in timings if name not in ("duel_wall_s", "note")]
    stages = " + ".join(f"{name} {timings[name]:.1f}" for name in names)
    note = f"{stages} s; {default.steps} steps + {test_reviews} test reviews"
    if (default.steps, test_reviews) != (PAPER_STEPS, PAPER_TEST_REVIEWS):
        note += f", not the paper-scale {PAPER_STEPS} steps + {PAPER_TEST_REVIEWS} test reviews"
    if "note" in timings:
        note += f"; {timings['note']}"
    return dataclasses.replace(
        default,
        stage="duel",
        wall_s=round(timings["duel_wall_s"], 1),
        reviews_per_s=None,
        tokens_per_s=None,
        padding_share=None,
        peak_vram_gib=None,
        nvml_peak_gib=None,
        energy_j_per_step=None,
        mfu=None,
        baseline_reviews_per_s=None,
        baseline_same_recipe_reviews_per_s=None,
        ratio_vs_baseline=None,
        note=note,
    )


def session1_records(raw: Path, common: dict[str, Any]) -> list[Record]:
    """baseline_<key>.jsonl, finetune_<key>_<tag>.json, evaluate_<key>.json, timings_<key>.json per model."""
    records: list[Record] = []
    common = common | {"call_stages_s": None}  # the duel record's note gives the stage seconds
    for path in sorted(raw.glob("finetune_*_default.json")):
        model = path.name.split("_")[1]
        baselines = baseline_records(read_baseline(raw / f"baseline_{model}.jsonl"), model, common)
        finetunes = []
        for tag in ("default", "paper", "budget"):
            if (p := raw / f"finetune_{model}_{tag}.json").exists():
                unrecorded = SESSION1_TRAIN | {
                    "padding": SESSION1_PAPER_PADDING if tag == "paper" else SESSION1_TRAIN["padding"],
                    "memory_budget_gib": SESSION1_BUDGET_GIB if tag == "budget" else None,
                }
                finetunes.append(finetune_record(unrecorded | json.loads(p.read_text()), tag, baselines, common))
        evaluate = json.loads((raw / f"evaluate_{model}.json").read_text())
        default = finetunes[0]  # the runner evaluated right after the default fine-tune
        test_reviews = evaluate[model]["finetuned"]["reviews"]
        timings = json.loads((raw / f"timings_{model}.json").read_text())
        records += baselines + finetunes + evaluate_records(evaluate, model, default, common)
        records.append(duel_record(timings, default, test_reviews))
    return records


def results_records(folder: Path, common: dict[str, Any]) -> list[Record]:
    """results.jsonl and log.txt of benchmarks/run_device.py, per model in the order the runner wrote them."""
    lines_read = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    results = [r for r in lines_read if r["kind"] != "call"]  # the runner's command line
    records: list[Record] = []
    for model in sorted({r["model"] for r in results}):
        lines = [r for r in results if r["model"] == model]
        context = common | {"call_stages_s": logged_stages(folder / "log.txt", model)}
        baselines = baseline_records([r["data"] for r in lines if r["kind"] == "baseline"], model, context)
        finetunes: list[Record] = []
        evaluates: list[Record] = []
        duels: list[Record] = []
        sweeps: list[Record] = []
        test_reviews = 0
        for line in lines:
            kind, tag, data = line["kind"], line["tag"], line["data"]
            if kind == "finetune":
                finetunes.append(finetune_record(data, tag, baselines, context))
            elif kind == "evaluate":
                evaluates += evaluate_records(data, model, finetunes[-1], context)
                test_reviews = data[model]["finetuned"]["reviews"]
            elif kind == "timings" and "finetune" in data:
                # with --no-default the runner's 'duel' timings lack the fine-tune: not a duel, no record
                default = next(r for r in finetunes if r.recipe == "default")
                duels.append(duel_record(data, default, test_reviews))
            elif kind == "sweep":
                sweeps.append(sweep_record(data, model, baselines, context))
            elif kind not in ("baseline", "timings", "gpu_tests"):
                raise ValueError(f"{folder / 'results.jsonl'}: unknown kind {kind!r}")
        records += baselines + finetunes + evaluates + duels + sweeps
    return records


def whole_duel(records: list[Record]) -> list[Record]:
    """The paper-scale duel of all models of one call: the sum of each model's measured chain of stages (download,
    tokenize, 200-step fine-tune, evaluate of all test reviews); none unless every model has one."""
    chains = [r for r in records if r.stage == "duel" and "not the paper-scale" not in r.note]
    models = sorted({r.model for r in records})
    if len(models) < 2 or sorted(r.model for r in chains) != models:
        return []
    total = round(sum(r.wall_s for r in chains), 1)
    parts = " + ".join(f"{r.model} {r.wall_s}" for r in chains)
    return [
        dataclasses.replace(
            chains[0],
            model="+".join(r.model for r in chains),
            wall_s=total,
            call_stages_s=None,
            note=f"{parts} = {total} s: each model's stages measured back to back in this call, one model per GPU "
            "of the host at the same time; one GPU runs them one after the other, which this sum is",
        )
    ]


def build_records(raw: Path) -> list[Record]:
    """Every measured configuration in one call folder below benchmarks/raw (its first part named <date>-<gpu>)."""
    run = raw.resolve().relative_to(RAW_ROOT).as_posix()
    date = datetime.date.fromisoformat(run[:10]).isoformat()
    with (raw / "gpu.csv").open() as f:
        gpu = next(csv.DictReader(f, skipinitialspace=True))["name"]
    common = {"date": date, "gpu": gpu, "run": run, "versions": json.loads((raw / "versions.json").read_text())}
    if folders := sorted(p.parent for p in raw.glob("*/results.jsonl")):  # --parallel: one folder per model
        records = [r for folder in folders for r in results_records(folder, common)]
    elif (raw / "results.jsonl").exists():  # one GPU: the models one after another, at the folder's top
        records = results_records(raw, common)
    else:
        return session1_records(raw, common)
    return records + whole_duel(records)


def read_records(path: Path) -> list[Record]:
    """records.jsonl; an unknown or missing field fails here."""
    return [Record(**json.loads(line)) for line in path.read_text().splitlines()] if path.exists() else []


def merge_records(path: Path, new: list[Record]) -> list[Record]:
    """records.jsonl without the records of the new records' runs, then the new ones."""
    runs = {r.run for r in new}
    return [r for r in read_records(path) if r.run not in runs] + new


def write_records(path: Path, records: list[Record]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in records))


@dataclasses.dataclass(frozen=True)
class DuelPiece:
    """One model's share of the composed paper-scale duel ESTIMATE, from stages measured in separate calls; each part
    in seconds, rounded to 0.1 s before it is added, so that the sums shown are the sums of the parts shown."""

    model: str
    finetune_run: str  # the call whose log timed download, tokenize and the 200-step default fine-tune
    download_s: float
    tokenize_s: float
    finetune_s: float
    evaluate_run: str  # the call whose evaluate gave the load time and the scoring rate
    evaluate_stage_s: float  # the whole evaluate process: start, model load, merge, scoring, writing
    eval_time_s: float  # the scoring alone
    eval_reviews_per_s: float

    @property
    def load_s(self) -> float:
        return round(self.evaluate_stage_s - self.eval_time_s, 1)

    @property
    def scoring_s(self) -> float:
        return round(PAPER_TEST_REVIEWS / self.eval_reviews_per_s, 1)

    @property
    def total_s(self) -> float:
        return round(self.download_s + self.tokenize_s + self.finetune_s + self.load_s + self.scoring_s, 1)


def duel_pieces(records: list[Record]) -> dict[str, list[DuelPiece]]:
    """Per model, one piece per call that logged a 200-step default fine-tune, with the evaluate of the newest call
    that logged one; models without both are left out."""
    pieces: dict[str, list[DuelPiece]] = {}
    for model in sorted({r.model for r in records}):
        evaluates = [
            r
            for r in records
            if r.model == model and r.stage == "evaluate" and r.recipe == "default" and r.call_stages_s
        ]
        finetunes = [
            r
            for r in records
            if r.model == model and r.stage == "finetune" and r.recipe == "default" and r.steps == PAPER_STEPS
        ]
        finetunes = [r for r in finetunes if r.call_stages_s and "finetune_default" in r.call_stages_s]
        if not evaluates or not finetunes:
            continue
        evaluate = max(evaluates, key=lambda r: r.run)
        pieces[model] = [
            DuelPiece(
                model=model,
                finetune_run=f.run,
                download_s=f.call_stages_s["download"],
                tokenize_s=f.call_stages_s["tokenize"],
                finetune_s=f.call_stages_s["finetune_default"],
                evaluate_run=evaluate.run,
                evaluate_stage_s=evaluate.call_stages_s["evaluate"],
                eval_time_s=evaluate.wall_s,
                eval_reviews_per_s=evaluate.reviews_per_s,
            )
            for f in sorted(finetunes, key=lambda r: r.run)
        ]
    return pieces


def duel_estimates(pieces: dict[str, list[DuelPiece]], models: set[str]) -> list[tuple[tuple[DuelPiece, ...], float]]:
    """All models' pieces in every combination of the measured calls, with the sum of their totals; none unless
    every model has pieces."""
    if set(pieces) != models:
        return []
    return [(combo, round(sum(p.total_s for p in combo), 1)) for combo in itertools.product(*pieces.values())]


def fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def on_off(value: bool | None) -> str:
    return "—" if value is None else "on" if value else "off"


def met(ok: bool) -> str:
    return "met" if ok else "not met"


def table_row(r: Record) -> str:
    """The README row of one record (the tests check one per record)."""
    if r.stage == "finetune":
        wall = fmt(r.wall_s, 2) + (" /step" if r.steps is None else "")
        return (
            f"| {r.recipe} | {r.quantization} | {r.micro_batch} x {r.grad_accum} | {on_off(r.gradient_checkpointing)} "
            f"| {r.steps or '—'} | {wall} | {fmt(r.reviews_per_s, 3)} | {fmt(r.tokens_per_s, 1)} | "
            f"{fmt(r.padding_share, 3)} | {fmt(r.peak_vram_gib)} | {fmt(r.nvml_peak_gib)} | "
            f"{fmt(r.energy_j_per_step, 1)} | {fmt(None if r.mfu is None else 100 * r.mfu, 1)} | "
            f"{fmt(r.baseline_reviews_per_s, 3)} | {fmt(r.ratio_vs_baseline, 3)} |"
        )
    if r.stage == "sweep":
        return (
            f"| {r.recipe} | {r.micro_batch} x {r.grad_accum} | {r.checkpointed_layers} | {fmt(r.wall_s, 3)} | "
            f"{fmt(r.reviews_per_s)} | {fmt(r.tokens_per_s, 1)} | {fmt(r.peak_vram_gib)} | "
            f"{fmt(r.ratio_vs_baseline, 3)} | {r.note} |"
        )
    if r.stage == "evaluate":
        return (
            f"| {r.model} | {r.recipe} | {r.quantization} | {fmt(r.wall_s)} | {fmt(r.reviews_per_s)} | "
            f"{fmt(r.peak_vram_gib)} | {fmt(r.nvml_peak_gib)} | {r.note} |"
        )
    return f"| {r.model} | {r.recipe} | {r.micro_batch} x {r.grad_accum} | {r.steps} | {fmt(r.wall_s, 1)} | {r.note} |"


def header(*columns: str) -> str:
    return "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"


FINETUNE_HEADER = header(
    "recipe",
    "quantization",
    "micro-batch x accum",
    "grad. ckpt",
    "steps",
    "wall s",
    "reviews/s",
    "real tokens/s",
    "padding share",
    "peak VRAM (torch reserved) GiB",
    "NVML peak GiB",
    "energy J/step",
    "MFU %",
    "baseline reviews/s",
    "ratio",
)
EVALUATE_HEADER = header(
    "model", "variant", "quantization", "wall s", "reviews/s", "peak VRAM (torch reserved) GiB", "NVML peak GiB", "note"
)
DUEL_HEADER = header("model", "recipe", "micro-batch x accum", "steps", "wall s", "stages")
SWEEP_HEADER = header(
    "kernels/variant",
    "micro-batch x accum",
    "checkpointed layers",
    "s/step",
    "reviews/s",
    "real tokens/s",
    "peak VRAM (torch reserved) GiB",
    "ratio to baseline",
    "note",
)

REPRODUCE = """\
## Reproducing these numbers

On a machine with two GPUs (each model on its own, with its own baseline in the same call), in one call:

```bash
bash benchmarks/device.sh llama deepseek --parallel --budget-gib 16 --budget-steps 50 --oom-gib 8 --profile-step
```

Per model this runs the baseline (`../shared/bench/hf_qlora_baseline.py`, copied into `.carry/`), the sweep, the
paper-scale duel's stages (download, tokenize, 200-step default fine-tune, evaluate of all 25,000 test reviews), the
16 GiB budget run and the 8 GiB out-of-memory back-off, then `python benchmarks/record.py` turns `$OUT` (copied
under `benchmarks/raw/`) into records. On one GPU, drop `--parallel`: the models then run one after the other.
`--compiled` adds the default and budget runs with `train.compile` (each compiling cold). The lent device here stops
a call at 10 minutes, so these numbers come from several calls: today's default and budget from session 4's calls 2
and 3 (`--parallel [--profile-step --sweep-kernels liger | --gpu-tests] --test-size 1000 --budget-gib 16
--budget-steps 30|50`), the measured duel from session 3's call 3 (`--parallel --baseline-last --budget-gib 0`, with
SDPA attention: the duel has not run since varlen attention); each run's section gives its command.
"""

MEASURED = """\
## How the numbers were measured

The models are the full 7B architectures with random weights: memory, speed and energy are real, accuracy is
meaningless. `.whl` (the wheels) and `.carry` (the hub cache, IMDB and the baseline script) travel to the GPU
machine; `benchmarks/device.sh` installs the wheels, writes gpu.csv and versions.json and runs
`benchmarks/run_device.py` with the stages' profile `benchmarks/profiles/h200.yaml`. A device call is limited to
10 minutes.

**Session 4** (runs `2026-11-30-h200-session4/call1` to `call3`): the same runner, two GPUs of one host per call.
The code adds `train.attention: varlen` (PyTorch's variable-length Flash Attention on the packed rows' boundaries,
registered as a transformers attention implementation; `auto` picks it for packed training on CUDA without
flash-attn) from call 2 on, `train.compile` (regional torch.compile of the decoder layers, off by default; call 1
ran it cold and was cut before its two runs ended) and, for call 3, `train.gradient_checkpointing: auto` back to the
fewest layers that fit the budget (call 2 had checkpointed all layers under 16 GiB). The default ran at 24.1 / 25.8
reviews/s with SDPA (call 1) and at 38.2-42.5 with varlen (calls 2 and 3), against baselines of 9.6-10.4 in all
three; those are different calls, and this CPU-bound path moves with the host (section "Stage-level levers"), so the
share of varlen in that jump is not separated from the host's: the same-call sweep A/B of call 2 is inconclusive.

**Session 3** (runs `2026-11-30-h200-session3/call1` to `call4`): the same runner. The code adds, after call 1,
Liger's fused RMSNorm, RoPE and SwiGLU kernels (`train.kernels: auto`, through transformers' Liger integration) and
gradient checkpointing sized to the memory budget (`train.gradient_checkpointing: auto`: the fewest decoder layers
that fit, from a memory model fitted to call 1's sweep); tokenize encodes each prompt once. The sweep
(`benchmarks/profile_step.py`, `--profile-step`) times a few optimizer steps of the default setup per execution
choice outside the Trainer; the profile showed the default step bound by the CPU's launching of kernels (CPU time
per step above the GPU's busy time), so host CPU speed and load move every fast-path number: the same code ran
llama's default at 32.7 reviews/s (call 2) and 29.7 (call 3) on the two-GPU host and 25.5 on the single-GPU host
(call 4), against baselines of 10.0-10.3 in each. Sweep rows are 4 steps each and noisy: the first variant after
the profiler always ran slow, and in call 2 the other model's process shared the host.

**Session 2** (runs `2026-11-30-h200-session2/call2`, `call3`, `call4`):
`bash benchmarks/device.sh llama deepseek --parallel ...` (call 2 without `--parallel`; each run's section gives its
flags). `run_device.py` (see its docstring) appends every result to results.jsonl the moment it exists, so a call cut
short keeps what it measured, and logs every stage process to log.txt, ending with `==== <tag>: exit N in S s`.
`--parallel` runs each model on its own GPU of the host at the same time, in its own copy of the project, results in
`<call>/<key>/`. Per model: the baseline's best configuration (micro-batch 16 x 1, nf4 + double quant,
checkpointing; 4 steps), then download, tokenize, finetune with the default recipe (200 steps), finetune with
`train.memory_budget_gib`, evaluate (the fine-tuned model only, all 25,000 test reviews unless `--test-size`), with
`--no-default` the default fine-tune left out and the baseline run last. The code differs from session 1's: the
default recipe lays each micro-batch's reviews end to end in packed rows of up to 2,048 tokens
(`train.padding: packed`), resolves `train.gradient_checkpointing: auto` to off where the training may use 80 GiB
or more (the whole H200) and on under a smaller memory budget, keeps the norms in bf16
(`quantization.upcast_fp32: false`, no fp32 upcast), and evaluates with the adapter merged into the dequantized base
(`eval.merge_adapter: true`). After these runs the packing changed: a micro-batch now goes into ceil(tokens / 2,048)
rows of about equal length instead of rows filled first-fit to 2,048, which over the 200 steps' reviews brings the
padding share from 0.198 to 0.028 (Llama-2) and from 0.203 to 0.025 (DeepSeek), counted in tokens; its speed has not
been measured on a GPU yet.

**Session 1** (run `2026-11-30-h200`): one device call per model,
`bash benchmarks/device.sh <key> --paper-steps 4 --budget-gib 16`. The call first runs the plain HF + PEFT +
bitsandbytes QLoRA baseline (`../shared/bench/hf_qlora_baseline.py`), then the project's stages (download, tokenize,
finetune with the default recipe, evaluate), then finetune again with the paper's recipe (`profiles/paper.yaml`) for
4 steps and with `train.memory_budget_gib 16`. Its default recipe padded each micro-batch of 16 reviews to its
longest review, with gradient checkpointing on.
"""

DEFINITIONS = f"""\
## Definitions

- **run**: the call folder below `benchmarks/raw`; a record belongs to one run, and a rerun of `record.py` on a folder
  replaces that run's records.
- **peak VRAM (torch reserved)**, `peak_vram_gib`: `torch.cuda.max_memory_reserved`, reset before the timed run.
- **NVML peak**, `nvml_peak_gib`: NVML device memory used, peak sampled every 50 ms; includes the CUDA context.
- **energy J/step**: from NVML's total energy counter over the timed run, divided by the optimizer steps.
- **tokens**: real tokens, padding excluded. The baseline's reviews are 512 random tokens with no padding, so its
  tokens are all real and its reviews/s = tokens/s / 512.
- **padding share**, `padding_share`: 1 - real tokens / token slots trained on (rows padded to the longest review of
  the micro-batch, to 512, or packed rows of up to 2,048 tokens, as the note's padding says).
- **MFU**: real tokens/s x FLOPs per token / {PEAK_FLOPS / 1e12:.0f} TFLOPS (the measured bf16 matrix rate).
  LoRA leaves the frozen weights without weight gradients, so a token costs the forward 2N + the activation
  gradients 2N = **4N** FLOPs without gradient checkpointing, and **6N** with it (the forward runs again, +2N); the
  grad. ckpt column says which applies (session 1's runs all had it on). N = total parameters. Attention FLOPs are
  left out.
- **baseline**: `../shared/bench/hf_qlora_baseline.py`, measured in the same device call on the same GPU (in a
  `--parallel` call, on the model's own GPU), on the same architecture; baseline reviews/s of a project row = the
  best nf4-dq baseline configuration of that call and model; ratio = reviews/s / baseline reviews/s. Baseline rows
  give seconds per optimizer step (16 reviews) as wall s, warm-up step excluded. The baseline trains a causal-LM loss
  on all 512 positions with full-vocabulary logits; the project computes only the answer logits, and its wall time
  includes the first (warm-up) step, which weighs most in short runs.
- **stages as logged**, `call_stages_s`: seconds of each stage process of the model in the call (start-up, loading,
  work, writing), from log.txt's `==== <tag>: exit 0 in S s`; an evaluate row's wall s is the scoring alone.
"""


def find(records: list[Record], stage: str, recipe: str) -> Record | None:
    return next((r for r in records if r.stage == stage and r.recipe == recipe), None)


def findings(records: list[Record]) -> list[str]:
    """What the numbers of one model in one call say, computed from them."""
    lines = []
    default, paper = find(records, "finetune", "default"), find(records, "finetune", "paper")
    budgets = [r for r in records if r.stage == "finetune" and r.memory_budget_gib is not None]
    evaluate, zero = find(records, "evaluate", "default"), find(records, "evaluate", "zero-shot")
    quantized = [r for r in records if r.recipe.startswith("baseline") and r.quantization == "nf4-dq"]
    unquantized = [r for r in records if r.recipe.startswith("baseline") and r.quantization == "none"]
    best = max(quantized, key=lambda r: r.reviews_per_s)
    model = records[0].model
    if default:
        lines.append(
            f"- {model}, default recipe ({default.steps} steps, padding_share {default.padding_share}, gradient "
            f"checkpointing {on_off(default.gradient_checkpointing)}, kernels {default.kernels}): "
            f"{default.reviews_per_s} reviews/s, "
            f"{default.ratio_vs_baseline}x the baseline's best quantized configuration ({best.recipe}, "
            f"{best.reviews_per_s} reviews/s, same call and GPU; target {TARGET_FINETUNE_RATIO}x: "
            f"{met(default.ratio_vs_baseline >= TARGET_FINETUNE_RATIO)}), with {default.peak_vram_gib} GiB torch "
            f"reserved peak against the baseline's {best.peak_vram_gib} GiB; MFU {100 * default.mfu:.1f}% "
            f"({6 if default.gradient_checkpointing else 4}N per token)."
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
    for budget in budgets:
        verdict = "under" if budget.peak_vram_gib < budget.memory_budget_gib else "over"
        compared = f"; default recipe in this call: {default.peak_vram_gib} GiB" if default else ""
        lines.append(
            f"- {model}, {budget.memory_budget_gib:g} GiB budget ({budget.steps} steps, the warm-up step included): "
            f"micro-batch {budget.micro_batch} x {budget.grad_accum}, gradient checkpointing "
            f"{on_off(budget.gradient_checkpointing)}"
            + (f" in {budget.checkpointed_layers} layers" if budget.checkpointed_layers is not None else "")
            + f", kernels {budget.kernels}, torch reserved peak {budget.peak_vram_gib} GiB ({verdict} the "
            f"budget by {abs(budget.memory_budget_gib - budget.peak_vram_gib):.1f} GiB{compared}), NVML peak "
            f"{budget.nvml_peak_gib} GiB including the CUDA context; {budget.reviews_per_s} reviews/s, "
            f"{budget.ratio_vs_baseline}x the baseline (target {TARGET_BUDGET_RATIO}x: "
            f"{met(budget.ratio_vs_baseline >= TARGET_BUDGET_RATIO)})."
        )
    if evaluate and zero:
        lines.append(
            f"- {model}, evaluate: with the LoRA adapter {evaluate.reviews_per_s} reviews/s, without it "
            f"{zero.reviews_per_s} ({ratio(zero.reviews_per_s, evaluate.reviews_per_s)}x); the finetuned "
            "variant runs first in the process, so its time includes the warm-up, and the zero-shot memory "
            "peaks repeat the finetuned ones because the allocator keeps its cache between the two."
        )
    elif evaluate and evaluate.call_stages_s:
        stage_s = evaluate.call_stages_s["evaluate"]
        lines.append(
            f"- {model}, evaluate: {evaluate.reviews_per_s} reviews/s (target {TARGET_EVAL_REVIEWS_PER_S:g}: "
            f"{met(evaluate.reviews_per_s >= TARGET_EVAL_REVIEWS_PER_S)}), scoring {evaluate.wall_s} s of the "
            f"stage's {stage_s} s: {stage_s - evaluate.wall_s:.1f} s went to start-up, loading and merging."
        )
    for r in unquantized:
        lines.append(
            f"- {model}, not shown by the ratio: the baseline without quantization ({r.recipe}, bf16 weights) runs "
            f"{r.reviews_per_s} reviews/s in {r.peak_vram_gib} GiB; the ratios compare quantized runs only."
        )
    return lines


def reviews_scored(r: Record) -> int:
    """The test reviews an evaluate record scored, as its note (evaluate_records) gives them."""
    return int(re.match(r"[\w-]+: (\d+) test reviews", r.note).group(1))


def summary(records: list[Record], estimates: list[tuple[tuple[DuelPiece, ...], float]]) -> str:
    """The issue's targets against every run's numbers, newest run first."""
    newest_first = sorted(records, key=lambda r: r.run, reverse=True)
    finetunes = [r for r in newest_first if r.stage == "finetune"]
    rows = [
        (f"fine-tune, default recipe: ≥ {TARGET_FINETUNE_RATIO}x the baseline's reviews/s", r, TARGET_FINETUNE_RATIO)
        for r in finetunes
        if r.recipe == "default"
    ]
    rows += [
        (
            f"fine-tune, {TARGET_BUDGET_GIB:g} GiB budget: ≥ {TARGET_BUDGET_RATIO}x the baseline's reviews/s",
            r,
            TARGET_BUDGET_RATIO,
        )
        for r in finetunes
        if r.memory_budget_gib == TARGET_BUDGET_GIB
    ]
    lines = [
        f"| {target} | {r.model} | {r.run} | {r.reviews_per_s} / {r.baseline_reviews_per_s} reviews/s = "
        f"{r.ratio_vs_baseline}x ({r.steps} steps) | {met(r.ratio_vs_baseline >= goal)} |"
        for target, r, goal in rows
    ]
    lines += [
        f"| evaluate: ≥ {TARGET_EVAL_REVIEWS_PER_S:g} reviews/s | {r.model} | {r.run} | {r.reviews_per_s} reviews/s "
        f"({reviews_scored(r):,} reviews) | "
        + (
            met(r.reviews_per_s >= TARGET_EVAL_REVIEWS_PER_S)
            if reviews_scored(r) >= JUDGED_EVAL_REVIEWS
            else "not judged: too few reviews, the rate is mostly the start-up"
        )
        + " |"
        for r in newest_first
        if r.stage == "evaluate" and r.recipe == "default"
    ]
    lines += [
        f"| paper-scale duel, both models: ≤ {TARGET_DUEL_S / 60:g} min | {r.model} | {r.run} | measured: {r.wall_s} s "
        f"= {r.wall_s / 60:.1f} min, the sum of each model's chain of stages (run section) | "
        f"{met(r.wall_s <= TARGET_DUEL_S)} |"
        for r in newest_first
        if r.stage == "duel" and "+" in r.model
    ]
    if estimates:
        totals = [total for _, total in estimates]
        lines.append(
            f"| paper-scale duel, both models: ≤ {TARGET_DUEL_S / 60:g} min | "
            + " + ".join(p.model for p in estimates[0][0])
            + f" | ESTIMATE from separately measured stages (next section) | {min(totals) / 60:.1f} to "
            f"{max(totals) / 60:.1f} min | {met(max(totals) <= TARGET_DUEL_S)} |"
        )
    return (
        "## Summary against the issue's targets\n\n"
        "Reviews/s of the project's run / the same call's baseline on the same GPU (its best nf4-dq configuration, "
        "reviews/s = tokens/s / 512). Session 1 (`2026-11-30-h200`) ran the earlier code.\n\n"
        + header("target", "model", "run", "measured", "met?")
        + "\n"
        + "\n".join(lines)
        + "\n"
    )


def estimate_section(pieces: dict[str, list[DuelPiece]], estimates: list[tuple[tuple[DuelPiece, ...], float]]) -> str:
    if not estimates:
        return ""
    rows = []
    for p in (p for model_pieces in pieces.values() for p in model_pieces):
        rows.append(
            f"| {p.model} | {p.finetune_run} | {p.evaluate_run} | {p.download_s} + {p.tokenize_s} + {p.finetune_s} "
            f"+ ({p.evaluate_stage_s} - {p.eval_time_s}) + {PAPER_TEST_REVIEWS} / {p.eval_reviews_per_s} "
            f"= {p.download_s} + {p.tokenize_s} + {p.finetune_s} + {p.load_s} + {p.scoring_s} | {p.total_s} |"
        )
    sums = [
        "- "
        + " + ".join(f"{p.model} ({p.finetune_run})" for p in combo)
        + " = "
        + " + ".join(str(p.total_s) for p in combo)
        + f" = **{total} s = {total / 60:.1f} min** "
        f"(target ≤ {TARGET_DUEL_S / 60:g} min: {met(total <= TARGET_DUEL_S)})"
        for combo, total in estimates
    ]
    parallel = max(max(p.total_s for p in combo) for combo, _ in estimates)
    tokenize = [
        f"{p.model}'s tokenize {p.tokenize_s} s in {p.finetune_run}"
        for model in pieces.values()
        if len(model) > 1
        for p in model
    ]
    return (
        "## Paper-scale duel: ESTIMATE, not a measurement\n\n"
        f"The issue's target: the whole paper-scale duel (both models: load, {PAPER_STEPS} steps, evaluation of all "
        f"{PAPER_TEST_REVIEWS:,} test reviews) in {TARGET_DUEL_S / 60:g} minutes or less. No call measured it in one "
        "go (a device call stops at 10 minutes). This is an ESTIMATE composed from separately measured stages, not a "
        f"measured duel: per model, download + tokenize + finetune (default recipe, {PAPER_STEPS} steps) as log.txt "
        "timed them in a call that ran them, plus evaluate = load (the evaluate stage's seconds minus its scoring "
        f"time eval_time_s) + {PAPER_TEST_REVIEWS:,} / the scoring rate, both from the newest call that evaluated "
        "(its scoring rate, measured on fewer reviews, scaled linearly). Seconds, each part rounded to 0.1 s:\n\n"
        + header(
            "model",
            "download, tokenize, finetune from",
            "evaluate from",
            "download + tokenize + finetune + (evaluate stage - scoring) + reviews / (reviews/s)",
            "model total s",
        )
        + "\n"
        + "\n".join(rows)
        + "\n\nAll models, one after another (as `dvc repro` runs the stages):\n\n"
        + "\n".join(sums)
        + "\n\nWhat the estimate leaves out or assumes: DVC's own overhead; the pipeline's download and tokenize are "
        "one process each for both models, here one per model (process start-up counted twice); download here reads "
        "the carried IMDB and hub files and writes random weights, not a network download; the pieces of `--parallel` "
        "calls were measured with the other model on the host's second GPU, and the CPU-bound stages ran slower there ("
        + ", ".join(tokenize)
        + "). Were the models run on one GPU each at once, as the `--parallel` calls did, the slowest would set the "
        f"time: about {parallel} s = {parallel / 60:.1f} min; the pipeline does not run that way today.\n"
    )


def run_to_run(records: list[Record]) -> str:
    """The same fine-tune configuration in several runs: the spread between runs."""
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        if r.stage == "finetune":
            key = (r.model, r.recipe, r.quantization, r.steps, r.micro_batch, r.grad_accum)
            groups.setdefault(key, []).append(r)
    rows = []
    for (model, recipe, quantization, steps, *_), group in sorted(groups.items(), key=lambda g: str(g[0])):
        if len(group) < 2:
            continue
        first, *later = sorted(group, key=lambda r: r.run)
        same = f"| {model} | {recipe} | {quantization} | {steps or '—'} |"
        rows.append(f"{same} {first.run} | {first.reviews_per_s} | — |")
        for r in later:
            change = 100 * (r.reviews_per_s / first.reviews_per_s - 1)
            rows.append(f"{same} {r.run} | {r.reviews_per_s} | {change:+.1f}% |")
    if not rows:
        return ""
    return (
        "## Run to run\n\n"
        "The same configuration measured in more than one run; difference in reviews/s from the first run listed "
        "(session 1's baseline is the same script as session 2's; call 4's baselines ran after the other stages, "
        "calls 3 and 4 with the other model on the host's second GPU).\n\n"
        + header("model", "recipe", "quantization", "steps", "run", "reviews/s", "difference")
        + "\n"
        + "\n".join(rows)
        + "\n"
    )


def run_section(call: list[Record]) -> str:
    first = call[0]
    models = list(dict.fromkeys(r.model for r in call if "+" not in r.model))  # not the whole duel's row
    versions = ", ".join(f"{k} {v}" for k, v in first.versions.items())
    parts = [f"## Run `{first.run}`: {first.date}, {first.gpu}\n\n{CALLS.get(first.run, UNDESCRIBED)}\n\n{versions}.\n"]
    logged = [
        f"- {model}: " + ", ".join(f"{tag} {s}" for tag, s in stages.items()) + f" s (sum {sum(stages.values()):.1f} s)"
        for model in models
        if (stages := next(r.call_stages_s for r in call if r.model == model))
    ]
    if logged:
        parts.append("Stages as logged (log.txt, in the order they ran):\n\n" + "\n".join(logged) + "\n")
    for model in models:
        if rows := [table_row(r) for r in call if r.model == model and r.stage == "finetune"]:
            parts.append(f"### Fine-tune, {model}\n\n{FINETUNE_HEADER}\n" + "\n".join(rows) + "\n")
    if rows := [table_row(r) for r in call if r.stage == "evaluate"]:
        parts.append("### Evaluate\n\n" + EVALUATE_HEADER + "\n" + "\n".join(rows) + "\n")
    if rows := [table_row(r) for r in call if r.stage == "duel"]:
        parts.append("### Duel (the runner's stages back to back)\n\n" + DUEL_HEADER + "\n" + "\n".join(rows) + "\n")
    for model in models:
        if rows := [table_row(r) for r in call if r.model == model and r.stage == "sweep"]:
            parts.append(
                f"### Sweep of execution choices, {model} (benchmarks/profile_step.py)\n\n{SWEEP_HEADER}\n"
                + "\n".join(rows)
                + "\n"
            )
    shows = [line for model in models for line in findings([r for r in call if r.model == model])]
    if not any(r.stage == "duel" for r in call):
        shows.append(
            "- Not shown: a duel (no default-recipe fine-tune and evaluate that both ran to the end in this call)."
        )
    shows.append("- Not shown: accuracy (random weights).")
    parts.append("### What this shows / what it does not\n\n" + "\n".join(shows) + "\n")
    return "\n".join(parts)


# Each lever: (name, variant measured, reference it is compared with, what was predicted before measuring it).
LEVERS = [
    ("Liger kernels, no checkpointing", "liger/default", "none/default", "1.05-1.10x (fewer kernel launches)"),
    ("Liger kernels, all layers checkpointed", "liger/ckpt-all", "none/ckpt-all", "1.05-1.10x"),
    (
        "varlen attention instead of SDPA's masked one",
        "liger/default",
        "liger/sdpa",
        "1.10-1.15x (no cuDNN plan per new shape: ~50 ms of CPU a step in the profile)",
    ),
    ("varlen attention, all layers checkpointed", "liger/ckpt-all", "liger/sdpa-ckpt-all", "1.10-1.15x"),
    ("rows of 1,024 tokens instead of 2,048", "liger/rows-1024", "liger/default", "up to 1.08x (less attention)"),
    ("rows of 4,096 tokens instead of 2,048", "liger/rows-4096", "liger/default", "below 1x (more attention)"),
    ("micro-batch 8 x 2 instead of 16 x 1", "liger/mb8", "liger/default", "about 0.9x (twice the launches)"),
    ("checkpointing in every layer", "liger/ckpt-all", "liger/default", "0.70-0.75x (a second forward)"),
    ("checkpointing in all layers but 4", "liger/ckpt-all-but-4", "liger/ckpt-all", "1.04x (4 of 32 fewer)"),
    ("checkpointing in half of the layers", "liger/ckpt-half", "liger/ckpt-all", "1.15x"),
]


def levers(records: list[Record]) -> str:
    """The execution levers, predicted and measured: per lever, the newest sweep holding both its variant and its
    reference for every model; seconds per step of the reference / of the variant (above 1: the lever pays)."""
    steps = {(r.run, r.model, r.recipe): r.wall_s for r in records if r.stage == "sweep"}
    models = sorted({model for _, model, _ in steps})
    rows = []
    for name, variant, reference, prediction in LEVERS:
        runs = [
            run
            for run in {run for run, _, _ in steps}
            if all((run, m, recipe) in steps for m in models for recipe in (variant, reference))
        ]
        if not runs:
            continue
        run = max(runs)
        measured = " | ".join(f"{steps[run, m, reference] / steps[run, m, variant]:.2f}x" for m in models)
        rows.append(f"| {name} | {prediction} | {measured} | `{variant}` / `{reference}` | `{run}` |")
    if not rows:
        return ""
    return (
        "## Levers: predicted, then measured in the sweeps\n\n"
        "Speed-up = seconds per step of the reference / of the variant, over the same 4 batches after a warm-up "
        "step, outside the Trainer, from the newest sweep that has both. These sweeps are noisy: 4 steps per row on "
        "a host shared with the other model's process, the first row of a sweep often slow (`none/default` in "
        "session 3, `liger/default` for deepseek in session 4), and the two models disagree by up to 0.6 on the "
        "same lever. Only a lever on which both models agree settles anything, and the targets are judged on the "
        "200-step stage runs (section \"Stage-level levers\" below). In session 3's sweep (SDPA's masked "
        "attention): a second micro-batch cost (0.66-0.73x), Liger paid with checkpointing on (1.20-1.34x), and "
        "checkpointing all layers but 4 did not pay against all (0.81-0.86x). In session 4's (varlen attention) "
        "all but 4 paid against all for both models, so `auto` checkpoints the fewest layers that fit again. "
        "Measured in earlier sessions, not swept: packing (padding share 0.41-0.45 down to 0.20, then 0.03 with "
        "balanced rows), checkpointing off, no fp32 upcast and answer-only logits, together 1.1-2.3x (Llama-2) and "
        "1.3-2.7x (DeepSeek) over session 1's default.\n\n"
        + header("lever", "predicted", *models, "variant / reference", "sweep")
        + "\n"
        + "\n".join(rows)
        + "\n"
    )


def stage_levers(records: list[Record]) -> str:
    """The 200-step default and the 16 GiB budget runs side by side with what each ran: attention, kernels and
    checkpointed layers, each ratio against its own call's baseline (the calls differ: so do their hosts)."""
    rows = [
        f"| {r.model} | {r.recipe} | {r.run} | {r.attention or '—'} | {r.kernels or '—'} | "
        f"{'—' if r.checkpointed_layers is None else r.checkpointed_layers} | {r.steps} | {fmt(r.reviews_per_s, 3)} | "
        f"{fmt(r.ratio_vs_baseline, 3)} | {fmt(r.peak_vram_gib)} |"
        for r in sorted(records, key=lambda r: (r.model, r.recipe, r.run))
        if r.stage == "finetune"
        and (r.recipe == "default" or r.memory_budget_gib == TARGET_BUDGET_GIB)
        and r.run >= "2026-11-30-h200-session3"
    ]
    if not rows:
        return ""
    return (
        "## Stage-level levers\n\n"
        "The default (200 steps) and the 16 GiB budget runs of sessions 3 and 4, with the attention, kernels and "
        "number of checkpointed layers each ran with (`—`: not recorded). Each ratio is against the baseline of its "
        "own call; different calls ran on different hosts, and the fast path, bound by the CPU launching kernels, "
        "moves with the host while the baseline does not (9.4-10.4 reviews/s in every call).\n\n"
        + header(
            "model", "recipe", "run", "attention", "kernels", "ckpt layers", "steps", "reviews/s", "ratio", "peak GiB"
        )
        + "\n"
        + "\n".join(rows)
        + "\n"
    )


def session_findings(records: list[Record]) -> str:
    """What changed between the runs, computed from the records."""
    defaults = sorted((r for r in records if r.stage == "finetune" and r.recipe == "default"), key=lambda r: r.run)
    budgets = sorted((r for r in records if r.stage == "finetune" and r.memory_budget_gib), key=lambda r: r.run)
    if not defaults:
        return ""
    lines = [
        "- Default recipe per run (padding share, gradient checkpointing, reviews/s, torch reserved peak): "
        + "; ".join(
            f"{r.run} {r.model}: {r.padding_share}, {on_off(r.gradient_checkpointing)}, {r.reviews_per_s}, "
            f"{r.peak_vram_gib} GiB"
            for r in defaults
        )
        + "."
    ]
    if budgets:
        lines.append(
            "- Memory budget runs (steps, gradient checkpointing, torch reserved peak / budget, reviews/s): "
            + "; ".join(
                f"{r.run} {r.model}: {r.steps}, {on_off(r.gradient_checkpointing)}, {r.peak_vram_gib} / "
                f"{r.memory_budget_gib:g} GiB = {r.peak_vram_gib / r.memory_budget_gib:.0%}, {r.reviews_per_s}"
                for r in budgets
            )
            + ". A budget run that peaks well under its budget was not limited by it; it differs from the default "
            "recipe by its checkpointing and by its fewer steps, the first (warm-up) step included in its time."
        )
    return "## What changed between the runs\n\n" + "\n".join(lines) + "\n"


def render_readme(records: list[Record]) -> str:
    measured = any(r.stage == "duel" and "+" in r.model for r in records)
    pieces = {} if measured else duel_pieces(records)  # an estimate only while no call measured a whole duel
    estimates = duel_estimates(pieces, {r.model for r in records})
    parts = [
        "# Benchmarks\n",
        "Generated by `python benchmarks/record.py` from records.jsonl; do not edit by hand.\n",
        summary(records, estimates),
        REPRODUCE,
        estimate_section(pieces, estimates),
        levers(records),
        stage_levers(records),
        session_findings(records),
        run_to_run(records),
        MEASURED,
    ]
    for run in sorted({r.run for r in records}, reverse=True):
        parts.append(run_section([r for r in records if r.run == run]))
    parts.append(DEFINITIONS)
    return "\n".join(part for part in parts if part)


def main() -> None:
    folders = [Path(a) for a in sys.argv[1:]] or sorted(p.parent for p in RAW_ROOT.glob("**/gpu.csv"))
    records_path = BENCH / "records.jsonl"
    for folder in folders:
        write_records(records_path, merge_records(records_path, build_records(folder)))
    records = read_records(records_path)  # the README shows what records.jsonl holds, nothing else
    with atomic_path(BENCH / "README.md") as tmp:
        tmp.write_text(render_readme(records))
    print(f"{len(records)} records -> {records_path}, {BENCH / 'README.md'}")


if __name__ == "__main__":
    main()
