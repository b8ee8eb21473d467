"""One device call: the plain HF + PEFT + bitsandbytes baseline and the project's own stages on the same GPU,
minutes apart, for one model. Results land in $OUT as JSON, one file per run, for benchmarks/record.py.

    python3 benchmarks/run_device.py llama [--paper-steps 6] [--budget-gib 16]

Runs: the baseline script (../shared/bench/hf_qlora_baseline.py, carried in .carry/), then download, tokenize,
finetune (default recipe), evaluate; then finetune again with the paper's recipe (profiles/paper.yaml) for
--paper-steps steps, and with a memory budget when --budget-gib is given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from duel.profile import apply, flatten

ARCH = {"llama": "llama2-7b", "deepseek": "deepseek-7b"}
OUT = Path(os.environ.get("OUT", "out"))


def write_params(key: str, *profiles: Path, **train: object) -> None:
    merged = yaml.safe_load(Path("params.base.yaml").read_text())
    for profile in profiles:
        merged = apply(merged, flatten(merged, yaml.safe_load(profile.read_text())))
    merged["models"] = {key: merged["models"][key]}
    merged["train"] |= train
    Path("params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))


def stage(name: str, *args: str, tag: str) -> float:
    start = time.perf_counter()
    with (OUT / f"{tag}.log").open("w") as log:
        code = subprocess.call([sys.executable, "-m", f"stages.{name}", *args], stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    print(f"{tag}: exit {code} in {seconds:.1f} s", flush=True)
    if code:
        print((OUT / f"{tag}.log").read_text()[-3000:], flush=True)
        raise SystemExit(code)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("key", choices=list(ARCH))
    parser.add_argument("--paper-steps", type=int, default=0)
    parser.add_argument("--budget-gib", type=float, default=0)
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    key, h200 = args.key, Path("benchmarks/profiles/h200.yaml")
    if not Path("params.base.yaml").exists():
        Path("params.base.yaml").write_text(Path("params.yaml").read_text())

    if not args.skip_baseline:
        start = time.perf_counter()
        with (OUT / f"baseline_{key}.jsonl").open("w") as out:
            subprocess.call([sys.executable, ".carry/hf_qlora_baseline.py", ARCH[key]], stdout=out)
        print(f"baseline {key}: {time.perf_counter() - start:.1f} s", flush=True)
        print((OUT / f"baseline_{key}.jsonl").read_text(), flush=True)

    timings: dict[str, float] = {}
    write_params(key, h200)
    duel_start = time.perf_counter()
    timings["download"] = stage("download", tag=f"download_{key}")
    timings["tokenize"] = stage("tokenize", tag=f"tokenize_{key}")
    timings["finetune"] = stage("finetune", key, tag=f"finetune_{key}_default")
    (OUT / f"finetune_{key}_default.json").write_text(Path(f"metrics/finetune_{key}.json").read_text())
    timings["evaluate"] = stage("evaluate", tag=f"evaluate_{key}")
    timings["duel_wall_s"] = time.perf_counter() - duel_start
    (OUT / f"evaluate_{key}.json").write_text(Path("metrics/evaluate.json").read_text())
    (OUT / f"timings_{key}.json").write_text(json.dumps(timings))

    if args.paper_steps:
        write_params(key, h200, Path("profiles/paper.yaml"), steps=args.paper_steps)
        stage("finetune", key, tag=f"finetune_{key}_paper")
        (OUT / f"finetune_{key}_paper.json").write_text(Path(f"metrics/finetune_{key}.json").read_text())
    if args.budget_gib:
        write_params(key, h200, memory_budget_gib=args.budget_gib)
        stage("finetune", key, tag=f"finetune_{key}_budget")
        (OUT / f"finetune_{key}_budget.json").write_text(Path(f"metrics/finetune_{key}.json").read_text())


if __name__ == "__main__":
    main()
