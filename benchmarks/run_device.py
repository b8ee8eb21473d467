"""The benchmark of one GPU: the plain HF + PEFT + bitsandbytes baseline and the project's own stages, minutes apart,
for each model asked for. Every result is appended to $OUT/results.jsonl the moment it exists (a call cut short
keeps what it measured); stage logs go to $OUT/log.txt. benchmarks/record.py turns the folder into records.

    python3 benchmarks/run_device.py llama deepseek [--budget-gib 16] [--budget-steps 30] [--oom-gib 8]
                                                    [--paper-steps 0] [--profile benchmarks/profiles/h200.yaml]
                                                    [--parallel] [--gpu-tests] [--profile-step]
                                                    [--baseline-last] [--no-default] [--test-size N]
                                                    [--compiled]
    python3 benchmarks/run_device.py llama deepseek --sweep 30 [--variants default,4bit]
    python3 benchmarks/run_device.py llama --ablation 3
    python3 benchmarks/run_device.py llama deepseek --together 60
    python3 benchmarks/run_device.py llama --peer 30
    python3 benchmarks/run_device.py deepseek --offload 20 --budget-gib 8
    python3 benchmarks/run_device.py llama deepseek --scoring 5000 [--variants left,flattened] [--profile-step]

--parallel runs each model on its own GPU at the same time (GPU i for the i-th model, each in its own copy of the
project under /tmp, results in $OUT/<key>/); --gpu-tests runs `pytest -m gpu` after the first model's runs;
--baseline-last runs the baseline after the duel's stages (a per-GPU chain of download, tokenize, 200 steps and
25,000 reviews then fits a 10-minute call); --no-default leaves the 200-step fine-tune out (the budget run's adapter
is then the one scored); --test-size N scores N test reviews; --profile-step profiles steps 3-5 of the finetune
stage's own run (duel/profiling.py, into $OUT/profile-<key>/); --compiled repeats the default and budget fine-tunes
with execution.compile (each stage process compiles cold).

--together N measures one GPU shared by the duel's two fine-tunes: both baselines, then N steps of the default
recipe for each model alone, one after the other, then the same two fine-tunes started at the same time (as two
workers of `dvc queue start -j 2` run them on a one-GPU host); no scoring.

--peer N measures the project against its peer at each memory budget of PEER_BUDGETS: per model, the baseline, then
N steps of the finetune stage at each budget, then benchmarks/peer.py (Unsloth) on the same tokenized reviews at the
same budgets (its wheels installed apart, in $PEER_SITE: they pin an older `datasets`); no scoring.

--sweep N measures how the default recipe's steps are executed: per model, the baseline, then N steps of the
finetune stage per execution variant of SWEEP (or those --variants names), on the same reviews; no scoring.
compiled-cold empties the call's compile cache and compiles into it; compiled-warm starts from it as the runs before
left it (the same model's, or the other model's: their decoder layers share their code).

--scoring N measures how scoring lays out its batches: per model, the zero_shot stage on N test reviews per
SCORING variant (execution.eval_padding), on the same reviews; with --profile-step, each variant again under
torch.profiler (batches 3-5); no training, no baseline (scoring has none).

--offload N measures execution.offload_checkpoints: per model, the baseline, then N steps of the finetune stage at
--budget-gib with offloading auto (on where every layer checkpointed would not fit), then off; no scoring.

--ablation N re-measures the paper's Table 3 instead: per model, both baselines (micro-batch 16, and the paper's
1 x 16), then N steps of the paper's recipe (profiles/paper.yaml) and of that recipe with one technique changed
(ABLATION), on 16 x N training reviews; no scoring.

Per model: the baseline's best configuration (micro-batch 16, nf4 + double quant, checkpointing), run by importing
../shared/bench/hf_qlora_baseline.py (carried in .carry/); then the paper-scale duel through the stages in order
(download, base, tokenize, finetune with the default recipe, evaluate) with the profile; then, from the same tokenized
data, finetune with a memory budget (--budget-gib, --budget-steps steps), the out-of-memory back-off shown with a
small budget and checkpointing off (--oom-gib), and the paper's recipe (--paper-steps, with the baseline's
micro-batch 1 x 16 beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from duel.profile import overlay

ARCH = {"llama": "llama2-7b", "deepseek": "deepseek-7b"}
OUT = Path(os.environ.get("OUT", "out"))
BASELINE = """
import importlib.util, json, os, sys, tempfile
spec = importlib.util.spec_from_file_location("baseline", ".carry/hf_qlora_baseline.py")
b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
name, mb, accum, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
path = os.path.join(tempfile.gettempdir(), f"ckpt-{name}")
b.make_ckpt(name, path)
b.run(name, path, True, mb, accum, True, steps)
"""


def emit(kind: str, model: str, tag: str, data: Any) -> None:
    with (OUT / "results.jsonl").open("a") as f:
        f.write(json.dumps({"kind": kind, "model": model, "tag": tag, "data": data}) + "\n")


def write_params(key: str, profiles: list[Path], **sections: dict[str, Any]) -> None:
    """params.yaml: the project's params with the profiles laid over them, the sections' values over those, and the
    models in `key` only (comma-separated keys for several)."""
    merged = yaml.safe_load(Path("params.base.yaml").read_text())
    for profile in profiles:
        merged = overlay(merged, yaml.safe_load(profile.read_text()))
    merged["models"] = {k: merged["models"][k] for k in key.split(",")}
    for section, values in sections.items():
        merged[section] |= values
    Path("params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))


# The compile cache the call's warm runs share (SWEEP's compiled-cold fills it afresh, compiled-warm reuses it, across
# the models and the runner's invocations of one call); every other process compiles cold in a cache of its own.
CALL_CACHE = Path(tempfile.gettempdir()) / "duel-inductor-call"


def call(
    cmd: list[str], tag: str, env: dict[str, str] | None = None, cache: Path | None = None
) -> tuple[int, float, str]:
    """Run a command, its stderr streamed into $OUT/log.txt (progress bars show even if the call is cut short)."""
    start = time.perf_counter()
    with (OUT / "log.txt").open("a") as log:
        log.write(f"==== {tag}\n")
        log.flush()
        with tempfile.TemporaryDirectory(prefix="inductor-") as own:
            extra = {"TORCHINDUCTOR_CACHE_DIR": str(cache or own), **(env or {})}
            done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=os.environ | extra)
        seconds = time.perf_counter() - start
        log.write(f"{done.stdout}\n==== {tag}: exit {done.returncode} in {seconds:.1f} s\n")
    print(f"{tag}: exit {done.returncode} in {seconds:.1f} s", flush=True)
    return done.returncode, seconds, done.stdout


def stage(name: str, *args: str, tag: str) -> float:
    code, seconds, _ = call([sys.executable, "-m", f"stages.{name}", *args], tag)
    if code:
        raise SystemExit(code)
    return seconds


def baseline(key: str, micro_batch: int, accum: int, steps: int) -> None:
    _, seconds, stdout = call(
        [sys.executable, "-c", BASELINE, ARCH[key], str(micro_batch), str(accum), str(steps)], f"baseline_{key}"
    )
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    for row in rows:
        emit("baseline", key, f"mb{micro_batch}x{accum}", row | {"call_s": round(seconds, 1)})


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def series(key: str, name: str) -> dict[int, float]:
    """A per-step series of the stage's DVCLive log (step, value), by step."""
    path = Path("plots") / key / "plots/metrics" / f"{name}.tsv"
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]] if path.exists() else []
    return {int(row[0]): float(row[-1]) for row in rows}


def steady_reviews_per_s(key: str) -> float | None:
    """Reviews per second after the first 2 steps (compiles and warm-ups)."""
    rates = list(series(key, "reviews_per_s").values())[2:]
    return round(len(rates) / sum(1 / r for r in rates), 3) if rates else None


def steady_gpu_util_pct(key: str) -> float | None:
    """GPU utilization over the steps after the first 2, each log line's mean weighted by its time."""
    utils, rates = series(key, "gpu_util_pct"), series(key, "reviews_per_s")
    steps = sorted(step for step in utils if step in rates)[2:]
    seconds = [1 / rates[step] for step in steps]
    return round(sum(utils[s] * t for s, t in zip(steps, seconds, strict=True)) / sum(seconds), 1) if steps else None


def finetune_result(key: str) -> dict[str, Any]:
    """A fine-tune's numbers (its metrics) with how it ran (beside its adapter), as one flat result."""
    training = read_json(Path("models/adapters") / key / "training.json")
    metrics = read_json(f"metrics/finetune_{key}.json")[key]
    metrics["steady_reviews_per_s"] = steady_reviews_per_s(key)
    metrics["steady_gpu_util_pct"] = steady_gpu_util_pct(key)
    metrics["first_loss"] = next(iter(series(key, "loss").values()), None)
    return (
        training["run"]
        | metrics
        | {
            "gradient_checkpointing": metrics["checkpointed_layers"] > 0,
            "memory_budget_gib": training["params"]["execution"]["memory_budget_gib"],
        }
    )


def evaluate_result(key: str) -> dict[str, Any]:
    """The fine-tuned model's scores, as {key: {"finetuned": ...}} (the runner leaves the zero-shot stage out)."""
    return {key: {"finetuned": read_json("metrics/evaluate.json")[key]}}


def finetune(key: str, tag: str, cache: Path | None = None, env: dict[str, str] | None = None) -> float | None:
    """The finetune stage of one model, its result emitted when it ends well; the stage process's seconds, None when
    it failed."""
    code, seconds, _ = call([sys.executable, "-m", "stages.finetune", key], f"finetune_{key}_{tag}", env, cache)
    if code:
        return None
    emit("finetune", key, tag, finetune_result(key) | {"stage_s": seconds, "env": env or {}})
    return seconds


def budget_run(key: str, profiles: list[Path], data: dict[str, Any], args: argparse.Namespace) -> None:
    budget = {"execution": {"memory_budget_gib": args.budget_gib}, "train": {"steps": args.budget_steps}}
    write_params(key, profiles, data=data, **budget)
    finetune(key, "budget")
    if args.compiled:
        write_params(key, profiles, data=data, train=budget["train"], execution=budget["execution"] | COMPILED)
        finetune(key, "budget-compiled")


COMPILED = {"compile": True, "kernels": "none"}  # inductor fuses RMSNorm, RoPE and SwiGLU itself
COMPILE_LOGS = {"TORCH_LOGS": "recompiles,graph_breaks"}


def together(keys: list[str], profiles: list[Path], steps: int) -> None:
    """One GPU, the duel's fine-tunes (N steps each): each alone, one after the other, then all at the same time,
    each process seeing the whole GPU. A `pair` result per way: the processes' wall time from the first start to the
    last end, and the reviews they trained (none when a fine-tune of that way failed)."""
    for key in keys:
        baseline(key, 16, 1, 4)
    data = {"train_size": 16 * steps, "test_size": 64}
    write_params(",".join(keys), profiles, data=data, train={"steps": steps})
    stage("download", tag="download")
    for key in keys:
        stage("base", key, tag=f"base_{key}")
    stage("tokenize", tag="tokenize")
    reviews = 16 * steps * len(keys)
    alone = [finetune(key, "alone") for key in keys]
    if None not in alone:
        emit("pair", "+".join(keys), "in-turn", {"wall_s": round(sum(alone), 1), "reviews": reviews, "steps": steps})
    start = time.perf_counter()
    with ThreadPoolExecutor(len(keys)) as pool:
        at_once = list(pool.map(lambda key: finetune(key, "together"), keys))
    wall = time.perf_counter() - start
    if None not in at_once:
        emit("pair", "+".join(keys), "together", {"wall_s": round(wall, 1), "reviews": reviews, "steps": steps})


PEER_BUDGETS = (8.0, 12.0, 16.0, 24.0, None)  # GiB; None: the whole GPU


def prepare_steps(key: str, profiles: list[Path], steps: int, test_size: int = 64) -> dict[str, Any]:
    """A short call's data: 16 x N training reviews (64 test reviews unless `test_size` says), through download, base
    and tokenize; the data section every fine-tune or scoring of the call then runs on."""
    data = {"train_size": 16 * steps, "test_size": test_size}
    write_params(key, profiles, data=data, train={"steps": steps})
    for name, args in (("download", ()), ("base", (key,)), ("tokenize", ())):
        stage(name, *args, tag=f"{name}_{key}")
    return data


def offload(key: str, profiles: list[Path], steps: int, budget_gib: float) -> None:
    baseline(key, 16, 1, 4)
    data = prepare_steps(key, profiles, steps)
    for way in ("auto", False):
        execution = {"memory_budget_gib": budget_gib, "offload_checkpoints": way}
        write_params(key, profiles, data=data, train={"steps": steps}, execution=execution)
        finetune(key, f"offload-{way or 'off'}")


def peer(key: str, profiles: list[Path], steps: int, variants: list[str]) -> None:
    """The project and Unsloth at each budget on the same N steps of reviews (steady_reviews_per_s: after 2 steps);
    then the SWEEP variants named, on those reviews."""
    baseline(key, 16, 1, 4)
    data = prepare_steps(key, profiles, steps)
    budgets = ",".join(str(b or 0) for b in PEER_BUDGETS)
    env = {"PYTHONPATH": os.pathsep.join([os.environ.get("PEER_SITE", ""), os.environ.get("PYTHONPATH", "")])}
    results = str(OUT / "results.jsonl")
    call(
        [sys.executable, "benchmarks/peer.py", key, "--budgets", budgets, "--no-checkpointing", "--results", results],
        f"peer_{key}",
        env,
    )
    for budget in PEER_BUDGETS:
        write_params(key, profiles, data=data, train={"steps": steps}, execution={"memory_budget_gib": budget})
        finetune(key, f"budget-{budget or 'none'}")
    run_variants(key, profiles, steps, data, variants)


# The paper's Table 3: its recipe, then with one technique switched (params sections laid over profiles/paper.yaml).
ABLATION: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {},
    "no-4bit": {"quantization": {"enabled": False}},
    "no-double-quant": {"quantization": {"double_quant": False}},
    "no-checkpointing": {"execution": {"gradient_checkpointing": False}},
    "eager-attention": {"execution": {"attention": "eager"}},  # no fused (Flash) attention kernel
    "micro-batch-16": {"execution": {"micro_batch": 16}},
}


EXPANDABLE = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}

# How the default recipe's steps are executed, one choice changed per variant (what is learned stays the same); "env"
# holds environment variables of the stage's process rather than params.
SWEEP: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    "rows-1024": {"execution": {"pack_tokens": 1024}},
    "rows-4096": {"execution": {"pack_tokens": 4096}},
    "mb8": {"execution": {"micro_batch": 8}},
    "ckpt-all": {"execution": {"gradient_checkpointing": True}},
    "sdpa": {"execution": {"attention": "sdpa"}},
    "no-liger": {"execution": {"kernels": "none"}},
    "4bit": {"execution": {"dequantize_base": False}},
    "dequantized": {"execution": {"dequantize_base": True}},
    "budget24": {"execution": {"memory_budget_gib": 24}},  # as many layers dequantized as fit, then unchecked
    "budget24-4bit": {"execution": {"memory_budget_gib": 24, "dequantize_base": False}},
    "budget24-dequantized": {"execution": {"memory_budget_gib": 24, "dequantize_base": True}},
    "flattened": {"execution": {"padding": "flattened"}},  # transformers' padding-free collator, one row
    "expandable": {"env": EXPANDABLE},  # PyTorch's allocator grows segments instead of allocating new blocks
    "no-expandable": {"execution": {"expandable_segments": False}},  # torch's default allocator (before the param)
    "log10": {"execution": {"logging_steps": 10}},  # the Trainer reads the loss (a host sync) every 10 steps
    "budget16-no-expandable": {"execution": {"memory_budget_gib": 16, "expandable_segments": False}},
    "flattened-expandable": {"execution": {"padding": "flattened"}, "env": EXPANDABLE},
    "budget12": {"execution": {"memory_budget_gib": 12}},
    "budget12-4bit": {"execution": {"memory_budget_gib": 12, "dequantize_base": False}},
    "budget16": {"execution": {"memory_budget_gib": 16}},
    "budget16-4bit": {"execution": {"memory_budget_gib": 16, "dequantize_base": False}},
    "budget16-flattened": {"execution": {"memory_budget_gib": 16, "padding": "flattened"}},
    "budget16-fused": {"execution": {"memory_budget_gib": 16, "fuse_projections": True}},
    "budget16-expandable": {"execution": {"memory_budget_gib": 16}, "env": EXPANDABLE},
    "budget8": {"execution": {"memory_budget_gib": 8}},
    "budget8-4bit": {"execution": {"memory_budget_gib": 8, "dequantize_base": False}},
    # every layer checkpointed and offloaded on the 4-bit base: what 8 GiB planned for before the allocator's share
    "budget8-offload": {"execution": {"memory_budget_gib": 8, "dequantize_base": False, "offload_checkpoints": True}},
    "budget8-embeddings-on-gpu": {"execution": {"memory_budget_gib": 8, "offload_embeddings": False}},
    "budget16-embeddings-on-host": {"execution": {"memory_budget_gib": 16, "offload_embeddings": True}},
    "budget8-expandable": {"execution": {"memory_budget_gib": 8}, "env": EXPANDABLE},
    "budget8-fused": {"execution": {"memory_budget_gib": 8, "fuse_projections": True}},
    "flex": {"execution": {"attention": "flex_attention"}},  # transformers' FlexAttention on the packed rows
    "graphs": {"execution": {"padding": "flattened", "cuda_graphs": True}},  # a CUDA graph per row length
    "fused": {"execution": {"fuse_projections": True}},  # q/k/v and gate/up computed together (duel/fused.py)
    "fused-4bit": {"execution": {"fuse_projections": True, "dequantize_base": False}},
    "graphs-fused": {"execution": {"padding": "flattened", "cuda_graphs": True, "fuse_projections": True}},
    "graphs-4bit": {"execution": {"padding": "flattened", "cuda_graphs": True, "dequantize_base": False}},
    # dynamo says in log.txt what compiled again and where a graph broke (the first warm step took 78 s on an H100)
    "compiled-cold": {"execution": {"dequantize_base": True} | COMPILED, "env": COMPILE_LOGS},
    "compiled-warm": {"execution": {"dequantize_base": True} | COMPILED, "env": COMPILE_LOGS},
}


def sweep(
    key: str, profiles: list[Path], steps: int, variants: list[str], with_baseline: bool = True
) -> dict[str, Any]:
    """The baseline, then N steps of the finetune stage per variant, on the same 16 x N training reviews (the data
    section returned)."""
    if with_baseline:
        baseline(key, 16, 1, 4)
    data = prepare_steps(key, profiles, steps)
    run_variants(key, profiles, steps, data, variants)
    return data


def run_variants(key: str, profiles: list[Path], steps: int, data: dict[str, Any], variants: list[str]) -> None:
    """N steps of the finetune stage per SWEEP variant, on the call's prepared reviews (prepare_steps' data)."""
    for variant in variants:
        sections = dict(SWEEP[variant])
        env = sections.pop("env", {})
        write_params(key, profiles, data=data, train={"steps": steps}, **sections)
        if variant == "compiled-cold":
            shutil.rmtree(CALL_CACHE, ignore_errors=True)
        finetune(key, f"sweep-{variant}", CALL_CACHE if variant.startswith("compiled-") else None, env)


SCORING = {"left": {"eval_padding": "left"}, "flattened": {"eval_padding": "flattened"}}


def scoring(key: str, profiles: list[Path], reviews: int, variants: list[str], profiled: bool) -> None:
    """The zero_shot stage (the base model, dequantized on a GPU of 40 GiB or more, as evaluate scores) on N test
    reviews per SCORING variant, one after the other on the same reviews; with `profiled`, each again under
    torch.profiler (batches 3-5, into $OUT/profile-<key>-scoring-<variant>/), measured apart."""
    data = prepare_steps(key, profiles, 1, test_size=reviews)
    for variant in variants:
        write_params(key, profiles, data=data, train={"steps": 1}, execution=SCORING[variant])
        tag = f"zero_shot_{key}_scoring-{variant}"
        code, seconds, _ = call([sys.executable, "-m", "stages.zero_shot", key], tag)
        if code:
            continue
        metrics = read_json(f"metrics/zero_shot_{key}.json")[key]["zero_shot"]
        how = read_json(Path("data/predictions") / f"{key}_zero_shot" / "scoring.json")
        emit("scoring", key, variant, metrics | {k: how[k] for k in ("attention", "padding")} | {"stage_s": seconds})
        if profiled:
            env = {"DUEL_PROFILE": str(OUT.resolve() / f"profile-{key}-scoring-{variant}"), "DUEL_PROFILE_STEPS": "2:3"}
            call([sys.executable, "-m", "stages.zero_shot", key], f"{tag}_profiled", env)


def profile_steps(key: str, profiles: list[Path], data: dict[str, Any]) -> None:
    """Steps 3-5 of the default recipe's finetune stage under torch.profiler (duel/profiling.py)."""
    write_params(key, profiles, data=data, train={"steps": 5})
    env = {"DUEL_PROFILE": str(OUT.resolve() / f"profile-{key}"), "DUEL_PROFILE_STEPS": "2:3"}
    call([sys.executable, "-m", "stages.finetune", key], f"profile_{key}", env)


def ablation(key: str, profiles: list[Path], steps: int) -> None:
    baseline(key, 16, 1, 4)
    baseline(key, 1, 16, 2)
    data = prepare_steps(key, profiles, steps)
    paper = [*profiles, Path("profiles/paper.yaml")]
    for variant, sections in ABLATION.items():
        write_params(key, paper, data=data, train={"steps": steps}, **sections)
        finetune(key, f"ablation-{variant}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("keys", nargs="+", choices=list(ARCH))
    parser.add_argument("--profile", type=Path, default=Path("benchmarks/profiles/h200.yaml"))
    parser.add_argument("--budget-gib", type=float, default=16)
    parser.add_argument("--budget-steps", type=int, default=30)
    parser.add_argument("--oom-gib", type=float, default=0)
    parser.add_argument("--paper-steps", type=int, default=0)
    parser.add_argument("--test-size", type=int, default=0, help="fewer test reviews than the profile's")
    parser.add_argument("--no-default", action="store_true", help="skip the default 200-step fine-tune")
    parser.add_argument("--baseline-last", action="store_true", help="the baseline after the duel's stages")
    parser.add_argument("--no-baseline", action="store_true", help="--sweep without the baseline (no speed ratios)")
    parser.add_argument("--parallel", action="store_true")
    parser.add_argument("--gpu-tests", action="store_true")
    parser.add_argument("--gpu-tests-k", help="with --gpu-tests: only the GPU tests pytest -k selects")
    parser.add_argument("--profile-step", action="store_true", help="profile steps 3-5 of the finetune stage")
    parser.add_argument("--compiled", action="store_true", help="the default and budget runs again, compiled")
    parser.add_argument("--sweep", type=int, default=0, help="N steps of the finetune stage per SWEEP variant")
    parser.add_argument(
        "--variants",
        default="",
        help="the SWEEP variants to run, comma-separated (--sweep: all by default; --peer: after it)",
    )
    parser.add_argument("--ablation", type=int, default=0, help="the paper's Table 3 in N steps per variant")
    parser.add_argument("--together", type=int, default=0, help="N steps per model: alone, then both at once")
    parser.add_argument("--peer", type=int, default=0, help="N steps per budget: the project, then Unsloth")
    parser.add_argument("--offload", type=int, default=0, help="N steps at --budget-gib, offloading auto then off")
    parser.add_argument("--scoring", type=int, default=0, help="N test reviews per SCORING variant (zero_shot)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    emit("call", ",".join(args.keys), "argv", {"argv": sys.argv[1:], "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    if args.parallel and len(args.keys) > 1:
        run_in_parallel(args.keys)
        return
    if not Path("params.base.yaml").exists():
        Path("params.base.yaml").write_text(Path("params.yaml").read_text())
    profiles = [args.profile]
    if args.together:
        together(args.keys, profiles, args.together)
        return

    data = {"test_size": args.test_size} if args.test_size else {}

    baseline_last = args.baseline_last or args.no_default
    for key in args.keys:
        if args.ablation:
            ablation(key, profiles, args.ablation)
            continue
        if args.peer:
            peer(key, profiles, args.peer, args.variants.split(",") if args.variants else [])
            gpu_tests(key, args)
            continue
        if args.offload:
            offload(key, profiles, args.offload, args.budget_gib)
            continue
        if args.scoring:
            variants = args.variants.split(",") if args.variants else list(SCORING)
            scoring(key, profiles, args.scoring, variants, args.profile_step)
            gpu_tests(key, args)
            continue
        if args.sweep:
            variants = args.variants.split(",") if args.variants else list(SWEEP)
            data = sweep(key, profiles, args.sweep, variants, with_baseline=not args.no_baseline)
            if args.profile_step:  # the default recipe's steps 3-5, on the sweep's reviews
                profile_steps(key, profiles, data)
            gpu_tests(key, args)
            continue
        if not baseline_last:
            baseline(key, 16, 1, 4)
        write_params(key, profiles, data=data)
        timings = {
            "download": stage("download", tag=f"download_{key}"),
            "base": stage("base", key, tag=f"base_{key}"),
            "tokenize": stage("tokenize", tag=f"tokenize_{key}"),
        }
        if args.profile_step:
            profile_steps(key, profiles, data)
        write_params(key, profiles, data=data)  # the default recipe again, after the profile's params
        if not args.no_default:
            timings["finetune"] = stage("finetune", key, tag=f"finetune_{key}_default")
            emit("finetune", key, "default", finetune_result(key))
        if args.budget_gib and args.no_default:  # its adapter is the one evaluate scores
            budget_run(key, profiles, data, args)
        timings["evaluate"] = stage("evaluate", tag=f"evaluate_{key}")
        emit("evaluate", key, "default", evaluate_result(key))
        emit("timings", key, "duel", timings | {"duel_wall_s": round(sum(timings.values()), 1)})
        if baseline_last:
            baseline(key, 16, 1, 4)
        if args.compiled and not args.no_default:
            write_params(key, profiles, data=data, execution=COMPILED)
            finetune(key, "compiled")
        if args.budget_gib and not args.no_default:
            budget_run(key, profiles, data, args)
        if args.oom_gib:
            small = {"memory_budget_gib": args.oom_gib, "gradient_checkpointing": False}
            write_params(key, profiles, data=data, train={"steps": 4}, execution=small)
            finetune(key, "oom")
        if args.paper_steps:
            baseline(key, 1, 16, 2)
            write_params(key, [*profiles, Path("profiles/paper.yaml")], train={"steps": args.paper_steps})
            finetune(key, "paper")
        gpu_tests(key, args)


def gpu_tests(key: str, args: argparse.Namespace) -> None:
    """--gpu-tests: `pytest -m gpu` once, after the first model's runs (--gpu-tests-k: a pytest -k selection)."""
    if args.gpu_tests and key == args.keys[0]:
        select = ["-k", args.gpu_tests_k] if args.gpu_tests_k else []
        code, _, stdout = call(
            [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-ra", *select, "tests/test_gpu.py"], "gpu"
        )
        emit("gpu_tests", key, "pytest", {"exit": code, "summary": stdout.strip().splitlines()[-1:]})


def run_in_parallel(keys: list[str]) -> None:
    """Each model on its own GPU, in its own copy of the project (the stages write params.yaml, data/, models/)."""
    flags = [a for a in sys.argv[1:] if a not in keys and a != "--parallel"]
    children = []
    for gpu, key in enumerate(keys):
        copy = Path(f"/tmp/bench-{key}")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(".", copy, symlinks=True, ignore=shutil.ignore_patterns("out", "checkpoints"))
        env = os.environ | {"CUDA_VISIBLE_DEVICES": str(gpu), "OUT": str(OUT.resolve() / key)}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(copy)) if p)
        own = [f for f in flags if gpu == 0 or f != "--gpu-tests"]  # the GPU tests once
        cmd = [sys.executable, "benchmarks/run_device.py", key, *own]
        children.append(subprocess.Popen(cmd, cwd=copy, env=env))
    codes = [child.wait() for child in children]
    if any(codes):
        raise SystemExit(max(codes))


if __name__ == "__main__":
    main()
