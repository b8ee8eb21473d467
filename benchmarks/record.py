"""Benchmark records: a device call's raw folder (the $OUT of benchmarks/device.sh: gpu.csv, versions.json, log.txt,
results.jsonl, at its top or per model) -> records.jsonl -> README.md (README.template.md, {{tables}} filled).

    .venv/bin/python benchmarks/record.py [benchmarks/raw/2026-12-01-h200-call01 ...]   # no folder: README only
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from duel.claims import (
    PEER_COLUMNS,
    PeerBudget,
    newest_ablation,
    peer_budgets,
    peer_rows,
    table3_markdown,
    within_budget,
)

BENCH = Path(__file__).resolve().parent
RUN_NAME = re.compile(r"(\d{4}-\d{2}-\d{2})-([a-z0-9]+)-call(\d+)")
STAGE_LOG = re.compile(r"^==== (\S+): exit 0 in ([\d.]+) s$", re.MULTILINE)  # run_device.py's end of a process
# MFU: the finetune stage's own (duel/telemetry.py: its projections' FLOPs per real token over the GPU's data-sheet
# peak) where the result has it; for calls before that, real tokens/s x FLOPs per token (4N: forward + activation
# gradients, frozen weights get none; 6N with checkpointing; N all parameters, attention left out) / the H200's bf16
# matrix rate measured here (8192^3: 769-798 TF/s).
PEAK_FLOPS = 790e12
MAX_LENGTH = 512  # data.max_length; the fine-tune metrics do not record it
# The targets: fine-tune reviews/s over the same call's baseline (default, 16 GiB budget); evaluate reviews/s, judged
# on at least 3,000 test reviews (on fewer it is mostly loading); the paper-scale duel's seconds.
TARGET_RATIO, TARGET_UTIL_PCT = {"default": 5.0, "budget": 3.5}, 90
DEFAULT_RECIPES = ("default", "sweep-default")  # the duel's fine-tune, or the sweep's run of the same params alone
TARGET_BUDGET_GIB, TARGET_EVAL_REVIEWS_PER_S, JUDGED_EVAL_REVIEWS = 16.0, 180.0, 3000
TARGET_PEER_RATIO = 1.2  # ahead of Unsloth at every budget, on the same reviews
PAPER_STEPS, PAPER_TEST_REVIEWS, TARGET_DUEL_S = 200, 25000, 8 * 60
TARGETS = [
    f"{PAPER_STEPS}-step fine-tune: ≥ {TARGET_RATIO['default']:g}x the baseline, ≥ {TARGET_UTIL_PCT}% busy",
    f"{TARGET_BUDGET_GIB:g} GiB budget: ≥ {TARGET_RATIO['budget']:g}x the baseline, no OOM, NVML within it",
    f"evaluate: ≥ {TARGET_EVAL_REVIEWS_PER_S:g} reviews/s",
]


@dataclasses.dataclass(frozen=True)
class Record:
    """One measured configuration of one device call; None: not measured, or not recorded by that call."""

    run: str  # <date>-<gpu>-call<NN>: the call's folder under benchmarks/raw
    date: str
    gpu: str  # as nvidia-smi names it
    # finetune | evaluate | scoring (zero_shot per scoring layout) | sweep | duel (all stages, back to back) | peer
    # (Unsloth) | pair (see shared_gpu)
    stage: str
    model: str
    # finetune: the runner's tag (default, budget, oom, paper, alone, ...) or baseline-mb<M>x<A>; evaluate: default |
    # zero-shot; sweep: <kernels>/<variant>; duel: default; pair: in-turn | together; peer: unsloth[-no-ckpt]
    recipe: str
    versions: dict[str, str]
    argv: str | None = None  # run_device.py's arguments for the call
    quantization: str | None = None  # nf4-dq | none
    memory_budget_gib: float | None = None
    gradient_checkpointing: bool | None = None  # as the run resolved it
    checkpointed_layers: int | None = None
    kernels: str | None = None  # liger | none: fused RMSNorm, RoPE and SwiGLU
    attention: str | None = None  # varlen | sdpa | flash_attention_2, as the run resolved it
    micro_batch: int | None = None
    grad_accum: int | None = None
    max_length: int = MAX_LENGTH
    steps: int | None = None
    test_reviews: int | None = None  # evaluate and duel: the test reviews scored
    # finetune, peer: all steps; evaluate: the scoring; duel: the stages' sum; baseline, sweep: a step; pair: see there
    wall_s: float | None = None
    startup_s: float | None = None  # finetune, evaluate: the stage process's start to its first step or review
    reviews_per_s: float | None = None
    steady_reviews_per_s: float | None = None  # after the first 2 steps (compiles, warm-ups); baseline: its steps
    tokens_per_s: float | None = None  # real tokens, padding excluded
    padding_share: float | None = None  # 1 - real tokens / token slots computed
    gpu_util_pct: float | None = None  # NVML's utilization, mean over the timed run
    steady_gpu_util_pct: float | None = None  # over the steps after the first 2 (finetune results that log it)
    peak_vram_gib: float | None = None  # torch.cuda.max_memory_reserved
    nvml_peak_gib: float | None = None  # NVML device memory used, CUDA context included
    outside_torch_gib: float | None = None  # device memory outside torch's allocator at the end (CUDA context, ...)
    alloc_retries: int | None = None  # torch's allocator released its cached blocks and tried again
    energy_j: float | None = None  # NVML's energy counter over the timed run
    energy_j_per_step: float | None = None
    oom_retries: int | None = None  # out-of-memory back-offs during the run
    mfu: float | None = None  # model FLOPs utilization, see PEAK_FLOPS
    baseline_reviews_per_s: float | None = None  # the same call's best nf4-dq baseline, same GPU and model
    ratio_vs_baseline: float | None = None  # reviews_per_s / baseline_reviews_per_s
    stages_s: dict[str, float] | None = None  # the model's stage processes in the call, seconds as log.txt has them
    note: str = ""


FIELDS = [field.name for field in dataclasses.fields(Record)]


# The runner's names for record fields (scoring's are prefixed eval_); a key naming no field is left out.
RENAMED = dict.fromkeys(("train_time_s", "eval_time_s", "step_s", "s_per_step"), "wall_s") | {
    **dict.fromkeys(("peak_vram_reserved_gib", "peak_reserved_gib", "eval_peak_vram_reserved_gib"), "peak_vram_gib"),
    **dict(gpu_util_mean_pct="gpu_util_pct", reviews="test_reviews", grad_ckpt="gradient_checkpointing"),
    **dict(accum="grad_accum", seq="max_length", eval_reviews_per_s="reviews_per_s", eval_energy_j="energy_j"),
    **dict(eval_gpu_util_mean_pct="gpu_util_pct", eval_nvml_peak_gib="nvml_peak_gib", eval_oom_retries="oom_retries"),
    **dict(eval_startup_s="startup_s", eval_tokens_per_s="tokens_per_s", eval_mfu="mfu"),
}


def build_record(kind: str, tag: str, data: dict[str, Any], call: dict[str, Any], baseline: float | None) -> Record:
    """One result of the runner -> one record: its figures under the records' names, what its kind implies, what the
    model's records in the call share (`call`), and a fine-tune's ratio to `baseline` (the call's best nf4-dq one)."""
    named = {RENAMED.get(key, key): value for key, value in data.items()}
    fields = {key: value for key, value in named.items() if key in FIELDS and key not in call}
    if kind == "baseline":  # random tokens, `seq` to a review, no padding: reviews/s = tokens/s / seq
        fields |= dict(recipe=f"baseline-mb{data['micro_batch']}x{data['accum']}", kernels="none", attention="sdpa")
        fields |= dict(quantization="none" if data["quant"] == "bf16" else data["quant"], padding_share=0.0)
        fields["reviews_per_s"] = round(data["tokens_per_s"] / data["seq"], 3)
        fields["steady_reviews_per_s"] = fields["reviews_per_s"]  # timed after a warm-up step
    elif kind == "finetune":
        flops_per_token = (6 if data["gradient_checkpointing"] else 4) * data["total_parameters"]
        recipe = "budget" if tag.startswith("budget-") else tag  # --peer's budget-<GiB>: the budget is a field
        fields |= {"recipe": recipe, "quantization": data["quantization"] or "none"}
        legacy = round(data["tokens_per_s"] * flops_per_token / PEAK_FLOPS, 4)  # calls before the stage had its own
        fields["mfu"] = data["mfu"] if data.get("mfu") is not None else legacy
        notes = [f"{data['offloaded_checkpoints']} layers offloaded" if data.get("offloaded_checkpoints") else ""]
        notes.append("input embeddings in host memory" if data.get("offloaded_embeddings") else "")
        dequantized = data.get("base_weights") == "unquantized" and data["quantization"] not in (None, "none")
        notes.append("base dequantized" if dequantized else "")
        partly = data.get("base_weights") == "partly dequantized"
        notes.append(f"base dequantized in {data['dequantized_layers']} layers" if partly else "")
        notes.append(f"{data.get('padding')} rows, CUDA graphs" if data.get("cuda_graphs") else "")
        notes.append(f"{data['fused_projections']} projection groups fused" if data.get("fused_projections") else "")
        notes.extend(f"{name}={value}" for name, value in data.get("env", {}).items())
        notes.append(f"allocator {data['allocator']}" if data.get("allocator") not in (None, "default") else "")
        if cache := data.get("compile_cache"):  # compiled layers: how many graphs the process compiled itself
            compiled, cached = cache["graphs_compiled"], cache["graphs_from_cache"]
            spent = f" in {cache['seconds']:g} s" if "seconds" in cache else ""
            notes.append(f"compiled{spent}: {compiled} graphs compiled, {cached} from the cache")
        fields["note"] = "; ".join(note for note in notes if note)
    elif kind == "peer":  # its own kernels and attention, NF4 with double quantization, offloaded checkpointing
        ckpt, wall_s = data["checkpointing"] != "none", round(data["steps"] * 16 / data["reviews_per_s"], 2)
        fields |= dict(recipe="unsloth" if ckpt else "unsloth-no-ckpt", quantization="nf4-dq", kernels="unsloth")
        fields |= dict(gradient_checkpointing=ckpt, grad_accum=16 // data["micro_batch"], wall_s=wall_s)
        fields["padding_share"] = round(1 - data["tokens_per_s"] / data["padded_tokens_per_s"], 4)
    elif kind == "evaluate":  # one variant's metrics; tag: finetuned | zero_shot
        fields |= {"recipe": "default" if tag == "finetuned" else "zero-shot"}
    elif kind == "scoring":  # the zero_shot stage under a SCORING variant (tag): execution.eval_padding
        fields |= {"recipe": f"scoring-{tag}", "note": f"{data['padding']} rows"}
    elif kind == "duel":  # the runner's timings, with the steps and test reviews of the call's default and evaluate
        fields |= {"recipe": "default", "wall_s": round(data["duel_wall_s"], 1)}
    else:
        raise ValueError(f"result kind {kind!r}: baseline, finetune, evaluate, scoring, peer, pair or duel")
    if kind in ("finetune", "peer") and baseline and fields.get("reviews_per_s"):
        fields |= dict(baseline_reviews_per_s=baseline, ratio_vs_baseline=round(fields["reviews_per_s"] / baseline, 3))
    return Record(stage="finetune" if kind == "baseline" else kind, **call, **fields)


# A pair's way (one after the other, at the same time) -> its members' recipe (run_device.py --together's tags).
PAIR_MEMBERS = {"in-turn": "alone", "together": "together"}


def pair_record(tag: str, data: dict[str, Any], members: list[dict[str, Any]], call: dict[str, Any]) -> Record:
    """The models' finetune stages on one GPU as one measurement (`members`: their results): all reviews over the
    processes' wall time, the members' GPU utilization weighted by their training time, the device's memory peak."""
    seconds = [m["train_time_s"] for m in members]
    util = sum(m["gpu_util_mean_pct"] * s for m, s in zip(members, seconds, strict=True)) / sum(seconds)
    fields = dict(recipe=tag, steps=data["steps"], wall_s=data["wall_s"], gpu_util_pct=round(util, 1))
    peak, retries = max(m["nvml_peak_gib"] for m in members), sum(m["oom_retries"] for m in members)
    rate = round(data["reviews"] / data["wall_s"], 3)
    return Record(stage="pair", **call, **fields, reviews_per_s=rate, nvml_peak_gib=peak, oom_retries=retries)


def logged_stages(log: str, model: str) -> dict[str, float]:
    """Seconds of the model's stage processes that ended well in log.txt (finetune_llama_x -> finetune_x)."""
    parts = [(tag.split("_"), float(seconds)) for tag, seconds in STAGE_LOG.findall(log)]
    return {"_".join(p for p in tag if p != model): seconds for tag, seconds in parts if model in tag}


def read_call(folder: Path) -> list[Record]:
    """Every measured configuration in one call folder, per model in the order the runner wrote them."""
    name = RUN_NAME.fullmatch(folder.name)
    if name is None:
        raise SystemExit(f"{folder}: a call folder is named <date>-<gpu>-call<NN>, e.g. 2026-12-01-h200-call01")
    with (folder / "gpu.csv").open() as f:
        gpu = next(csv.DictReader(f, skipinitialspace=True))["name"]
    results = [p for p in (folder / "results.jsonl", *sorted(folder.glob("*/results.jsonl"))) if p.exists()]
    lines = [json.loads(line) for path in results for line in path.read_text().splitlines()]
    logs = "".join(p.read_text() for p in (folder / "log.txt", *sorted(folder.glob("*/log.txt"))) if p.exists())
    argv = next((" ".join(r["data"]["argv"]) for r in lines if r["kind"] == "call"), None)
    shared = dict(run=folder.name, date=name[1], gpu=gpu, versions=json.loads((folder / "versions.json").read_text()))
    shared["argv"] = argv
    records = []
    tuned = {(r["model"], r["tag"]): r["data"] for r in lines if r["kind"] == "finetune"}
    for model in dict.fromkeys(r["model"] for r in lines if r["kind"] not in ("call", "gpu_tests")):
        mine = [r for r in lines if r["model"] == model]
        call = shared | {"model": model, "stages_s": logged_stages(logs, model) or None}
        quantized = [r["data"] for r in mine if r["kind"] == "baseline" and r["data"]["quant"] == "nf4-dq"]
        baseline = max((round(b["tokens_per_s"] / b["seq"], 3) for b in quantized), default=None)
        steps = test_reviews = None
        for kind, tag, data in ((r["kind"], r["tag"], r["data"]) for r in mine):
            if kind in ("baseline", "finetune", "peer", "scoring"):
                records.append(build_record(kind, tag, data, call, baseline))
                steps = data["steps"] if (kind, tag) == ("finetune", "default") else steps
            elif kind == "evaluate":
                records += [build_record(kind, v, m, call, baseline) for v, m in data[model].items()]
                test_reviews = data[model]["finetuned"]["reviews"]
            elif kind == "pair":  # its members: each model's finetune result of that way
                members = [tuned[m, PAIR_MEMBERS[tag]] for m in model.split("+")]
                records.append(pair_record(tag, data, members, call))
            elif kind == "timings" and "finetune" in data:  # without the default fine-tune it is no duel
                duel = data | {"steps": steps, "test_reviews": test_reviews}
                records.append(build_record("duel", tag, duel, call, baseline))
    return records


def read_records(path: Path) -> list[Record]:
    """records.jsonl; a record with a field missing or unknown fails here."""
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    if wrong := next((list(r) for r in records if list(r) != FIELDS), None):
        raise ValueError(f"{path}: a record's fields {wrong} are not Record's {FIELDS}")
    return [Record(**r) for r in records]


def write_atomically(path: Path, text: str) -> None:
    """A temp file, then a rename: a run that dies leaves the old file whole."""
    (tmp := path.with_name(f".{path.name}.tmp")).write_text(text)
    os.replace(tmp, path)


def newest(records: list[Record]) -> Record | None:
    return max(records, key=lambda r: r.run, default=None)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    frame = pd.DataFrame(rows, columns=columns, dtype=object)
    return frame.where(frame.notna(), None).to_markdown(index=False, missingval="—")


def target_row(target: str, model: str, r: Record | None, met: bool, figure: str = "") -> dict[str, Any]:
    """One target's row: the record that judges it (None: no call measured it) and whether it meets it."""
    if r is None:
        return dict(target=target, model=model, measured="not measured")
    if r.stage == "evaluate":
        figure = f"{r.reviews_per_s} reviews/s on {r.test_reviews:,} test reviews"
    elif r.stage == "finetune":
        backoffs = f", {r.oom_retries} OOM back-offs, NVML {r.nvml_peak_gib} GiB" if r.memory_budget_gib else ""
        figure = f"{r.reviews_per_s} / {r.baseline_reviews_per_s} reviews/s = {r.ratio_vs_baseline:.2f}x{backoffs}"
    row = dict(target=target, model=model, run=r.run, measured=figure, gpu_util_pct=r.gpu_util_pct)
    return row | dict(peak_vram_gib=r.peak_vram_gib, met="yes" if met else "no")


def meets(r: Record) -> bool:
    if r.stage == "evaluate":
        return r.reviews_per_s >= TARGET_EVAL_REVIEWS_PER_S
    fast = r.ratio_vs_baseline >= TARGET_RATIO["default" if r.recipe in DEFAULT_RECIPES else r.recipe]
    if r.recipe == "budget":  # and it fits a card of the budget's size: NVML's peak, the CUDA context included
        return fast and r.oom_retries == 0 and within_budget(r.nvml_peak_gib, r.memory_budget_gib) is True
    return fast and r.gpu_util_pct >= TARGET_UTIL_PCT


def targets(records: list[Record]) -> str:
    """Each target per model against the newest call that measured it; the duel: the newest with every model."""
    models = sorted({r.model for r in records if r.stage != "pair"})
    rows, peer = [], peer_budgets([dataclasses.asdict(r) for r in records])
    for model in models:
        tuned = [r for r in records if r.model == model and r.stage == "finetune" and r.ratio_vs_baseline]
        scored = [r for r in records if r.model == model and r.stage == "evaluate" and r.recipe == "default"]
        default = [r for r in tuned if r.recipe in DEFAULT_RECIPES and r.steps == PAPER_STEPS]
        budget = [r for r in tuned if r.recipe == "budget" and r.memory_budget_gib == TARGET_BUDGET_GIB]
        evaluate = [r for r in scored if r.test_reviews >= JUDGED_EVAL_REVIEWS]
        picks = zip(TARGETS, (default, budget, evaluate), strict=True)
        rows += [target_row(t, model, r := newest(c), r is not None and meets(r)) for t, c in picks]
        rows.append(peer_target(model, [b for b in peer if b.model == model]))
    duels = [r for r in records if r.stage == "duel" and (r.steps, r.test_reviews) == (PAPER_STEPS, PAPER_TEST_REVIEWS)]
    last = newest([r for r in duels if {d.model for d in duels if d.run == r.run} == set(models)])
    chain = [r for r in duels if last and r.run == last.run]
    total_s = sum(r.wall_s for r in chain)
    figure = " + ".join(str(r.wall_s) for r in chain) + f" = {total_s:.1f} s = {total_s / 60:.1f} min"
    duel = f"paper-scale duel, the models one after another: ≤ {TARGET_DUEL_S / 60:g} min"
    rows.append(target_row(duel, " + ".join(models), last, total_s <= TARGET_DUEL_S, figure))
    return table(rows, ["target", "model", "run", "measured", "gpu_util_pct", "peak_vram_gib", "met"])


def peer_target(model: str, budgets: list[PeerBudget]) -> dict[str, Any]:
    """The newest peer call's budgets for a model: met when the project ran at least TARGET_PEER_RATIO times the
    peer's steady reviews/s at every budget, each within its budget on the card (NVML's peak)."""
    target = f"against Unsloth: ≥ {TARGET_PEER_RATIO:g}x at every budget, NVML within it"
    if not budgets:
        return dict(target=target, model=model, measured="not measured")
    slowest = min(budgets, key=lambda b: b.ratio)
    over = [f"{b.budget_gib:g}" for b in budgets if not b.project_fits]
    where = f"{slowest.budget_gib:g} GiB" if slowest.budget_gib else "whole GPU"
    figure = f"{slowest.ratio:.2f}x at its lowest ({where}); over budget on the card at: {', '.join(over) or 'none'}"
    met = slowest.ratio >= TARGET_PEER_RATIO and not over
    return dict(target=target, model=model, run=budgets[0].run, measured=figure, met="yes" if met else "no")


FINETUNE_COLUMNS = [
    *("model", "recipe", "run", "attention", "kernels", "gradient_checkpointing", "checkpointed_layers"),
    *("padding_share", "steps", "reviews_per_s", "steady_reviews_per_s", "baseline_reviews_per_s"),
    *("ratio_vs_baseline", "gpu_util_pct", "steady_gpu_util_pct", "peak_vram_gib", "nvml_peak_gib", "note"),
]


def finetunes(records: list[Record]) -> str:
    """The project's fine-tunes of every call, with what each ran and its ratio to its own call's baseline."""
    mine = [r for r in records if r.stage == "finetune" and r.recipe not in PAIR_MEMBERS.values()]
    runs = [r for r in mine if not r.recipe.startswith(("baseline", "ablation"))]
    rows = [dataclasses.asdict(r) for r in sorted(runs, key=lambda r: (r.model, r.recipe, r.run))]
    return table(rows, FINETUNE_COLUMNS)


SCORING_COLUMNS = [
    *("model", "recipe", "run", "attention", "test_reviews", "reviews_per_s", "tokens_per_s", "mfu", "gpu_util_pct"),
    *("startup_s", "peak_vram_gib", "nvml_peak_gib", "note"),
]


def scorings(records: list[Record]) -> str:
    """Every scoring run: the evaluate stage of the duel (fine-tuned, zero-shot), and the zero_shot stage per
    scoring layout (--scoring)."""
    runs = [r for r in records if r.stage in ("evaluate", "scoring")]
    rows = [dataclasses.asdict(r) for r in sorted(runs, key=lambda r: (r.model, r.recipe, r.run))]
    return table(rows, SCORING_COLUMNS)


SHARED_GPU_COLUMNS = [
    *("run", "stage", "model", "recipe", "steps", "wall_s", "reviews_per_s", "ratio_vs_baseline", "gpu_util_pct"),
    *("nvml_peak_gib", "oom_retries", "note"),
]


def shared_gpu(records: list[Record]) -> str:
    """The duel's fine-tunes on one GPU, in turn and together: each pair record (with its speed-up), its members."""
    rows = []
    for pair in sorted((r for r in records if r.stage == "pair"), key=lambda r: (r.run, r.recipe)):
        in_turn = next((r for r in records if (r.run, r.stage, r.recipe) == (pair.run, "pair", "in-turn")), None)
        speedup = f"{in_turn.wall_s / pair.wall_s:.2f}x the speed of in-turn" if in_turn not in (None, pair) else ""
        rows.append(dataclasses.asdict(pair) | {"note": speedup})
        way = PAIR_MEMBERS[pair.recipe]
        members = [r for r in records if (r.run, r.stage, r.recipe) == (pair.run, "finetune", way)]
        rows += [dataclasses.asdict(r) | {"wall_s": r.stages_s.get(f"finetune_{way}")} for r in members]
    return table(rows, SHARED_GPU_COLUMNS)


def peers(records: list[Record]) -> str:
    """Budget by budget, the project against its peer and the plain stack (duel.claims renders it for the report)."""
    return table(peer_rows([dataclasses.asdict(r) for r in records]), PEER_COLUMNS)


def ablation(records: list[Record]) -> str:
    """The paper's Table 3 re-measured: the newest ablation call per model (duel.claims renders it for the report)."""
    return "\n".join(table3_markdown(newest_ablation([dataclasses.asdict(r) for r in records])))


def render_readme(records: list[Record]) -> str:
    text = (BENCH / "README.template.md").read_text()
    sections = {"targets": targets, "finetunes": finetunes, "scoring": scorings, "peers": peers}
    sections["shared_gpu"] = shared_gpu
    for name, filled in (sections | {"ablation": ablation}).items():
        text = text.replace("{{" + name + "}}", filled(records))
    return text


def main() -> None:
    records_path = BENCH / "records.jsonl"
    records = read_records(records_path)
    for folder in map(Path, sys.argv[1:]):
        records = [r for r in records if r.run != folder.name] + read_call(folder)
    if sys.argv[1:]:
        write_atomically(records_path, "".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in records))
    write_atomically(BENCH / "README.md", render_readme(records))
    print(f"{len(records)} records -> {records_path.name}, README.md")


if __name__ == "__main__":
    main()
