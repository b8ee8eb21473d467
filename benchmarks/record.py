"""Benchmark records: the raw folder of one device call -> benchmarks/records.jsonl -> benchmarks/README.md.

    .venv/bin/python benchmarks/record.py benchmarks/raw/2026-12-01-h200-call01   # add a call, render the README
    .venv/bin/python benchmarks/record.py                                          # render the README only

A call folder (the $OUT of benchmarks/device.sh) holds gpu.csv, versions.json, and results.jsonl ({"kind", "model",
"tag", "data"} per line) with log.txt, at its top or, with --parallel, in <model>/. The README is README.template.md
with its {{tables}} filled from records.jsonl; both are written atomically.
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

from duel.claims import newest_ablation, table3_markdown

BENCH = Path(__file__).resolve().parent
RUN_NAME = re.compile(r"(\d{4}-\d{2}-\d{2})-([a-z0-9]+)-call(\d+)")
STAGE_LOG = re.compile(r"^==== (\S+): exit 0 in ([\d.]+) s$", re.MULTILINE)  # run_device.py's end of a process
# MFU = real tokens/s x FLOPs per token / the H200's bf16 matrix rate as measured on this machine kind (8192^3
# products: 769-798 TFLOP/s; no real kernel reaches the datasheet's 989). LoRA leaves the frozen weights without
# weight gradients: a token costs 2N (forward) + 2N (activation gradients) = 4N FLOPs, and 6N with gradient
# checkpointing (a second forward). N = total parameters; attention FLOPs are left out.
PEAK_FLOPS = 790e12
MAX_LENGTH = 512  # data.max_length; the fine-tune metrics do not record it
# The targets: fine-tune reviews/s over the same call's baseline; evaluate reviews/s; the paper-scale duel.
TARGET_RATIO = {"default": 3.0, "budget": 2.0}
TARGET_BUDGET_GIB = 16.0
TARGET_EVAL_REVIEWS_PER_S = 100.0
JUDGED_EVAL_REVIEWS = 3000  # on fewer test reviews an evaluate's rate is mostly loading and warm-up
PAPER_STEPS, PAPER_TEST_REVIEWS = 200, 25000
TARGET_DUEL_S = 15 * 60


@dataclasses.dataclass(frozen=True)
class Record:
    """One measured configuration of one device call; None: not measured, or not recorded by that call."""

    run: str  # <date>-<gpu>-call<NN>: the call's folder under benchmarks/raw
    date: str
    gpu: str  # as nvidia-smi names it
    # finetune | evaluate | sweep | duel (download, tokenize, finetune, evaluate back to back) | pair (the models'
    # finetune stages on one GPU, as one measurement: model is "llama+deepseek")
    stage: str
    model: str
    # finetune: the runner's tag (default, budget, oom, paper, compiled, alone, together, ...) or
    # baseline-mb<M>x<A>; evaluate: default | zero-shot; sweep: <kernels>/<variant>; duel: default;
    # pair: in-turn (one after the other) | together (at the same time)
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
    # finetune: all steps, the first (warm-up) one included; evaluate: the scoring; duel: the stages' sum;
    # baseline and sweep rows: seconds per optimizer step; pair: from the first stage's start to the last one's end
    wall_s: float | None = None
    reviews_per_s: float | None = None
    tokens_per_s: float | None = None  # real tokens, padding excluded
    padding_share: float | None = None  # 1 - real tokens / token slots computed
    gpu_util_pct: float | None = None  # NVML's utilization, mean over the timed run
    peak_vram_gib: float | None = None  # torch.cuda.max_memory_reserved
    nvml_peak_gib: float | None = None  # NVML device memory used, CUDA context included
    energy_j: float | None = None  # NVML's energy counter over the timed run
    energy_j_per_step: float | None = None
    oom_retries: int | None = None  # out-of-memory back-offs during the run
    mfu: float | None = None  # model FLOPs utilization, see PEAK_FLOPS
    baseline_reviews_per_s: float | None = None  # the same call's best nf4-dq baseline, same GPU and model
    ratio_vs_baseline: float | None = None  # reviews_per_s / baseline_reviews_per_s
    stages_s: dict[str, float] | None = None  # the model's stage processes in the call, seconds as log.txt has them
    note: str = ""

    @property
    def order(self) -> tuple[str, int]:
        """Calls in the order they ran: date, then call number."""
        return self.date, int(RUN_NAME.fullmatch(self.run)[3])


FIELDS = [field.name for field in dataclasses.fields(Record)]


# The runner's names for record fields; a key of a result that names a field neither here nor in Record is left out.
RENAMED = {
    **dict.fromkeys(("train_time_s", "eval_time_s", "step_s", "s_per_step"), "wall_s"),
    **dict.fromkeys(("peak_vram_reserved_gib", "peak_reserved_gib"), "peak_vram_gib"),
    **{"gpu_util_mean_pct": "gpu_util_pct", "reviews": "test_reviews", "grad_ckpt": "gradient_checkpointing"},
    **{"accum": "grad_accum", "seq": "max_length"},
    # Scoring's cost, prefixed in the evaluate and zero-shot metrics.
    **{"eval_reviews_per_s": "reviews_per_s", "eval_gpu_util_mean_pct": "gpu_util_pct", "eval_energy_j": "energy_j"},
    **{"eval_peak_vram_reserved_gib": "peak_vram_gib", "eval_nvml_peak_gib": "nvml_peak_gib"},
    **{"eval_oom_retries": "oom_retries"},
}


def build_record(kind: str, tag: str, data: dict[str, Any], call: dict[str, Any], baseline: float | None) -> Record:
    """One result of the runner -> one record: what it reports under the records' names, what its kind implies,
    what every record of the model in the call shares (`call`), and the ratio to `baseline` (the call's best nf4-dq
    baseline reviews/s for the model) of a fine-tune."""
    named = {RENAMED.get(key, key): value for key, value in data.items()}
    fields = {key: value for key, value in named.items() if key in FIELDS and key not in call}
    if kind == "baseline":  # random tokens, `seq` to a review, no padding: reviews/s = tokens/s / seq
        fields |= {
            "recipe": f"baseline-mb{data['micro_batch']}x{data['accum']}",
            "kernels": "none",
            "attention": "sdpa",
            "quantization": "none" if data["quant"] == "bf16" else data["quant"],
            "padding_share": 0.0,
        }
        fields["reviews_per_s"] = round(data["tokens_per_s"] / data["seq"], 3)
    elif kind == "finetune":
        flops_per_token = (6 if data["gradient_checkpointing"] else 4) * data["total_parameters"]
        fields |= {"recipe": tag, "quantization": data["quantization"] or "none"}
        fields["mfu"] = round(data["tokens_per_s"] * flops_per_token / PEAK_FLOPS, 4)
    elif kind == "evaluate":  # one variant's metrics; tag: finetuned | zero_shot
        fields |= {"recipe": "default" if tag == "finetuned" else "zero-shot"}
    elif kind == "duel":  # the runner's timings, with the steps and test reviews of the call's default and evaluate
        fields |= {"recipe": "default", "wall_s": round(data["duel_wall_s"], 1)}
    else:
        raise ValueError(f"result kind {kind!r}: baseline, finetune, evaluate, pair or duel")
    if kind == "finetune" and baseline and fields.get("reviews_per_s"):
        fields |= {
            "baseline_reviews_per_s": baseline,
            "ratio_vs_baseline": round(fields["reviews_per_s"] / baseline, 3),
        }
    return Record(stage="finetune" if kind == "baseline" else kind, **call, **fields)


# A pair's way (one after the other, at the same time) -> its members' recipe (run_device.py --together's tags).
PAIR_MEMBERS = {"in-turn": "alone", "together": "together"}


def pair_record(tag: str, data: dict[str, Any], members: list[dict[str, Any]], call: dict[str, Any]) -> Record:
    """The models' finetune stages on one GPU as one measurement (`members`: their results): all reviews trained
    over the wall time of the stage processes (start-up and loading included), the GPU's utilization as the members
    saw it (NVML's is the device's) weighted by their training time, the device's memory peak."""
    seconds = [m["train_time_s"] for m in members]
    util = sum(m["gpu_util_mean_pct"] * s for m, s in zip(members, seconds, strict=True)) / sum(seconds)
    fields = {"recipe": tag, "steps": data["steps"], "wall_s": data["wall_s"], "gpu_util_pct": round(util, 1)}
    fields |= {"reviews_per_s": round(data["reviews"] / data["wall_s"], 3)}
    fields |= {"nvml_peak_gib": max(m["nvml_peak_gib"] for m in members)}
    fields |= {"oom_retries": sum(m["oom_retries"] for m in members)}
    return Record(stage="pair", **call, **fields)


def logged_stages(log: str, model: str) -> dict[str, float]:
    """Seconds of each of the model's stage processes that ended well, from log.txt's `==== <tag>: exit 0 in S s`;
    the model's key leaves the tag (finetune_llama_default -> finetune_default)."""
    return {
        "_".join(p for p in tag.split("_") if p != model): float(seconds)
        for tag, seconds in STAGE_LOG.findall(log)
        if model in tag.split("_")
    }


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
    shared = {
        "run": folder.name,
        "date": name[1],
        "gpu": gpu,
        "versions": json.loads((folder / "versions.json").read_text()),
        "argv": next((" ".join(r["data"]["argv"]) for r in lines if r["kind"] == "call"), None),
    }
    records = []
    tuned = {(r["model"], r["tag"]): r["data"] for r in lines if r["kind"] == "finetune"}
    for model in dict.fromkeys(r["model"] for r in lines if r["kind"] not in ("call", "gpu_tests")):
        mine = [r for r in lines if r["model"] == model]
        call = shared | {"model": model, "stages_s": logged_stages(logs, model) or None}
        quantized = [r["data"] for r in mine if r["kind"] == "baseline" and r["data"]["quant"] == "nf4-dq"]
        baseline = max((round(b["tokens_per_s"] / b["seq"], 3) for b in quantized), default=None)
        steps = test_reviews = None
        for kind, tag, data in ((r["kind"], r["tag"], r["data"]) for r in mine):
            if kind in ("baseline", "finetune"):
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
    for r in records:
        if list(r) != FIELDS:
            raise ValueError(f"{path}: a record's fields {list(r)} are not Record's {FIELDS}")
    return [Record(**r) for r in records]


def write_atomically(path: Path, text: str) -> None:
    """A temp file, then a rename: a run that dies leaves the old file whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def newest(records: list[Record]) -> Record | None:
    return max(records, key=lambda r: r.order, default=None)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    frame = pd.DataFrame(rows, columns=columns, dtype=object)
    return frame.where(frame.notna(), None).to_markdown(index=False, missingval="—")


def target_row(target: str, model: str, r: Record | None, met: bool, figure: str = "") -> dict[str, Any]:
    """One target's row: the record that judges it (None: no call measured it) and whether it meets it."""
    if r is None:
        return {"target": target, "model": model, "measured": "not measured"}
    if r.stage == "evaluate":
        figure = f"{r.reviews_per_s} reviews/s on {r.test_reviews:,} test reviews"
    elif r.stage == "finetune":
        backoffs = f", {r.oom_retries} OOM back-offs" if r.memory_budget_gib else ""
        figure = f"{r.reviews_per_s} / {r.baseline_reviews_per_s} reviews/s = {r.ratio_vs_baseline:.2f}x{backoffs}"
    row = {"target": target, "model": model, "run": r.run, "measured": figure, "gpu_util_pct": r.gpu_util_pct}
    return row | {"peak_vram_gib": r.peak_vram_gib, "met": "yes" if met else "no"}


def targets(records: list[Record]) -> str:
    """Each target per model against the newest call that measured it; the duel against the newest call in which
    every model ran it at paper scale."""
    models = sorted({r.model for r in records if r.stage != "pair"})
    default_target = f"default fine-tune, {PAPER_STEPS} steps: ≥ {TARGET_RATIO['default']:g}x the baseline's reviews/s"
    budget_target = f"{TARGET_BUDGET_GIB:g} GiB budget: ≥ {TARGET_RATIO['budget']:g}x the baseline's, no OOM"
    evaluate_target = f"evaluate: ≥ {TARGET_EVAL_REVIEWS_PER_S:g} reviews/s"
    rows = []
    for model in models:
        tuned = [r for r in records if r.model == model and r.stage == "finetune" and r.ratio_vs_baseline]
        default = newest([r for r in tuned if r.recipe == "default" and r.steps == PAPER_STEPS])
        budget = newest([r for r in tuned if r.recipe == "budget" and r.memory_budget_gib == TARGET_BUDGET_GIB])
        scored = [r for r in records if r.model == model and r.stage == "evaluate" and r.recipe == "default"]
        evaluate = newest([r for r in scored if r.test_reviews >= JUDGED_EVAL_REVIEWS])
        default_met = default and default.ratio_vs_baseline >= TARGET_RATIO["default"]
        budget_met = budget and budget.ratio_vs_baseline >= TARGET_RATIO["budget"] and budget.oom_retries == 0
        evaluate_met = evaluate and evaluate.reviews_per_s >= TARGET_EVAL_REVIEWS_PER_S
        rows += [
            target_row(default_target, model, default, default_met),
            target_row(budget_target, model, budget, budget_met),
            target_row(evaluate_target, model, evaluate, evaluate_met),
        ]
    duels = [r for r in records if r.stage == "duel" and (r.steps, r.test_reviews) == (PAPER_STEPS, PAPER_TEST_REVIEWS)]
    last = newest([r for r in duels if {d.model for d in duels if d.run == r.run} == set(models)])
    chain = [r for r in duels if last and r.run == last.run]
    total_s = sum(r.wall_s for r in chain)
    figure = " + ".join(str(r.wall_s) for r in chain) + f" = {total_s:.1f} s = {total_s / 60:.1f} min"
    duel = f"paper-scale duel, the models one after another: ≤ {TARGET_DUEL_S / 60:g} min"
    rows.append(target_row(duel, " + ".join(models), last, total_s <= TARGET_DUEL_S, figure))
    return table(rows, ["target", "model", "run", "measured", "gpu_util_pct", "peak_vram_gib", "met"])


FINETUNE_COLUMNS = [
    *("model", "recipe", "run", "attention", "kernels", "gradient_checkpointing", "checkpointed_layers"),
    *("padding_share", "steps", "reviews_per_s", "baseline_reviews_per_s", "ratio_vs_baseline", "gpu_util_pct"),
    "peak_vram_gib",
]


def finetunes(records: list[Record]) -> str:
    """The project's fine-tunes of every call, with what each ran and its ratio to its own call's baseline."""
    mine = [r for r in records if r.stage == "finetune" and r.recipe not in PAIR_MEMBERS.values()]
    runs = [r for r in mine if not r.recipe.startswith(("baseline", "ablation"))]
    rows = [dataclasses.asdict(r) for r in sorted(runs, key=lambda r: (r.model, r.recipe, r.order))]
    return table(rows, FINETUNE_COLUMNS)


SHARED_GPU_COLUMNS = [
    *("run", "stage", "model", "recipe", "steps", "wall_s", "reviews_per_s", "ratio_vs_baseline", "gpu_util_pct"),
    *("nvml_peak_gib", "oom_retries", "note"),
]


def shared_gpu(records: list[Record]) -> str:
    """The duel's fine-tunes on one GPU, one after the other and at the same time: each way's pair record (together:
    with the ratio of the in-turn wall time to its own), then its members."""
    rows = []
    for pair in sorted((r for r in records if r.stage == "pair"), key=lambda r: (r.order, r.recipe)):
        in_turn = next((r for r in records if (r.run, r.stage, r.recipe) == (pair.run, "pair", "in-turn")), None)
        speedup = f"{in_turn.wall_s / pair.wall_s:.2f}x the speed of in-turn" if in_turn not in (None, pair) else ""
        rows.append(dataclasses.asdict(pair) | {"note": speedup})
        way = PAIR_MEMBERS[pair.recipe]
        members = [r for r in records if (r.run, r.stage, r.recipe) == (pair.run, "finetune", way)]
        rows += [dataclasses.asdict(r) | {"wall_s": r.stages_s.get(f"finetune_{way}")} for r in members]
    return table(rows, SHARED_GPU_COLUMNS)


def sweeps(records: list[Record]) -> str:
    """Each sweep variant's ratio to its call's baseline, a column per model and call."""
    sweep = sorted((r for r in records if r.stage == "sweep"), key=lambda r: (r.order, r.model))
    columns = list(dict.fromkeys(f"{r.model} {r.run}" for r in sweep))
    ratios = {(r.recipe, f"{r.model} {r.run}"): r.ratio_vs_baseline for r in sweep}
    variants = sorted({r.recipe for r in sweep})
    return table([{"variant": v} | {c: ratios.get((v, c)) for c in columns} for v in variants], ["variant", *columns])


def ablation(records: list[Record]) -> str:
    """The paper's Table 3 re-measured: the newest ablation call per model (duel.claims renders it for the report
    too)."""
    return "\n".join(table3_markdown(newest_ablation([dataclasses.asdict(r) for r in records])))


def render_readme(records: list[Record]) -> str:
    text = (BENCH / "README.template.md").read_text()
    sections = {"targets": targets, "finetunes": finetunes, "sweeps": sweeps, "shared_gpu": shared_gpu}
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
