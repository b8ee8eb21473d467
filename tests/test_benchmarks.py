"""benchmarks/record.py run as a script, in a copy of benchmarks/ made here, on call folders made here as
benchmarks/device.sh and benchmarks/run_device.py write them: the records it writes and the README tables it renders
from them."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from duel.params import ParamsError, parse_params
from duel.profile import overlay

REPO = Path(__file__).resolve().parents[1]
TOTAL_PARAMETERS = 6_738_415_616
VERSIONS = {"torch": "2.11.0", "cuda": "13.0", "transformers": "5.17.0", "peft": "0.21.0", "bitsandbytes": "0.50.2"}


def bench_copy(base: Path) -> Path:
    """base/benchmarks: record.py and its README template, no records yet."""
    bench = base / "benchmarks"
    (bench / "raw").mkdir(parents=True)
    for name in ("record.py", "README.template.md"):
        shutil.copy(REPO / "benchmarks" / name, bench / name)
    return bench


def run_record(bench: Path, *folders: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(bench / "record.py"), *map(str, folders)], capture_output=True, text=True, cwd=bench
    )


def read_records(bench: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (bench / "records.jsonl").read_text().splitlines()]


def finetune(model: str, reviews_per_s: float, steps: int, budget_gib: float | None, oom_retries: int) -> dict:
    """The finetune stage's metrics JSON as run_device.py emits it."""
    return {
        "model": model,
        "steps": steps,
        "train_time_s": round(steps * 16 / reviews_per_s, 2),
        "reviews_per_s": reviews_per_s,
        "tokens_per_s": reviews_per_s * 300,
        "padded_tokens_per_s": reviews_per_s * 310,
        "padding_share": 0.03,
        "nvml_peak_gib": 15.8 if budget_gib else 61.5,  # within the target's 16 GiB on the card
        "gpu_util_mean_pct": 71.5,
        "energy_j": 1000.0 * steps,
        "peak_vram_allocated_gib": 12.0,
        "peak_vram_reserved_gib": 14.5 if budget_gib else 60.0,
        "energy_j_per_step": 1000.0,
        "outside_torch_gib": 1.3,
        "alloc_retries": 2 if budget_gib else 0,
        "attention": "varlen",
        "kernels": "liger",
        "compiled": False,
        "precision": "bf16",
        "quantization": "nf4-dq",
        "padding": "packed",
        "gradient_checkpointing": budget_gib is not None,
        "checkpointed_layers": 28 if budget_gib else 0,
        "memory_budget_gib": budget_gib,
        "micro_batch": 16,
        "grad_accum": 1,
        "oom_retries": oom_retries,
        "trainable_parameters": 39_976_960,
        "total_parameters": TOTAL_PARAMETERS,
    }


def model_results(model: str, speeds: dict[str, float], test_reviews: int, budget_oom_retries: int = 0) -> list[dict]:
    """One model's lines of results.jsonl: baseline, the 200-step default, evaluate, the runner's timings and the 16
    GiB budget run; `speeds` gives baseline tokens/s and the others' reviews/s."""
    baseline = {"quant": "nf4-dq", "micro_batch": 16, "accum": 1, "grad_ckpt": True, "seq": 512, "step_s": 1.6}
    baseline |= {"tokens_per_s": speeds["baseline_tokens_per_s"], "peak_reserved_gib": 15.9, "call_s": 50.0}
    scored = {"reviews": test_reviews, "eval_time_s": round(test_reviews / speeds["evaluate"], 2)}
    scored |= {"reviews_per_s": speeds["evaluate"], "nvml_peak_gib": 22.0, "gpu_util_mean_pct": 88.0}
    scored |= {"energy_j": 5000.0, "peak_vram_reserved_gib": 21.0, "kernels": "liger", "accuracy": 0.5}
    timings = {"download": 30.0, "tokenize": 20.0, "finetune": speeds["finetune_s"], "evaluate": speeds["evaluate_s"]}
    timings["duel_wall_s"] = sum(timings.values())
    lines = [
        ("baseline", "mb16x1", baseline),
        (
            "finetune",
            "default",
            finetune(model, speeds["default"], 200, None, 0) | {"gpu_util_mean_pct": speeds["util"]},
        ),
        ("evaluate", "default", {model: {"finetuned": scored}}),
        ("timings", "duel", timings),
        ("finetune", "budget", finetune(model, speeds["budget"], 50, 16.0, budget_oom_retries)),
        ("gpu_tests", "pytest", {"exit": 0, "summary": ["8 passed"]}),
    ]
    return [{"kind": kind, "model": model, "tag": tag, "data": data} for kind, tag, data in lines]


def write_call(folder: Path, results: dict[str, list[dict]]) -> Path:
    """A --parallel call folder: gpu.csv and versions.json (device.sh), then per model <model>/results.jsonl and
    <model>/log.txt (run_device.py), each stage's process ending in `==== <tag>: exit N in S s`."""
    folder.mkdir(parents=True)
    (folder / "gpu.csv").write_text("name, driver_version, memory.total [MiB]\nNVIDIA H200, 580.0, 143771 MiB\n")
    (folder / "versions.json").write_text(json.dumps(VERSIONS))
    argv = ["llama", "deepseek", "--parallel", "--budget-gib", "16"]
    call = {"kind": "call", "model": ",".join(results), "tag": "argv", "data": {"argv": argv}}
    (folder / "results.jsonl").write_text(json.dumps(call) + "\n")
    for model, lines in results.items():
        (folder / model).mkdir()
        (folder / model / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        timings = next(line["data"] for line in lines if line["kind"] == "timings")
        stages = {f"baseline_{model}": 50.0, f"download_{model}": timings["download"]}
        stages |= {f"tokenize_{model}": timings["tokenize"], f"finetune_{model}_default": timings["finetune"]}
        stages |= {f"evaluate_{model}": timings["evaluate"], f"finetune_{model}_budget": 40.0}
        stages |= {f"finetune_{model}_compiled": 9.0}  # a run that failed: exit 1, no result line
        log = "".join(
            f"==== {tag}\nprogress\n==== {tag}: exit {int('compiled' in tag)} in {s} s\n" for tag, s in stages.items()
        )
        (folder / model / "log.txt").write_text(log)
    return folder


# llama meets every target; deepseek's default is 5.5x with the GPU 71.5% busy and its budget run backed off once.
LLAMA = {"baseline_tokens_per_s": 5120.0, "default": 52.0, "util": 92.5, "budget": 36.0, "evaluate": 190.0}
LLAMA |= {"finetune_s": 60.0, "evaluate_s": 80.0}
DEEPSEEK = {"baseline_tokens_per_s": 5120.0, "default": 55.0, "util": 71.5, "budget": 40.0, "evaluate": 90.0}
DEEPSEEK |= {"finetune_s": 70.0, "evaluate_s": 120.0}


def cells(line: str) -> list[str]:
    """The cells of a Markdown table's row."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def target_rows(readme: str, target: str) -> dict[str, list[str]]:
    """The targets table's rows whose target starts with `target`, by model: their cells."""
    rows = [cells(line) for line in readme.splitlines() if line.startswith("| ")]
    return {row[1]: row for row in rows if row[0].startswith(target)}


def test_a_budget_run_over_the_budget_on_the_card_misses_its_target(tmp_path: Path) -> None:
    """Fast and without a back-off, but NVML counted more than the budget (the CUDA context on top of torch's cap):
    it would not fit a card of that size, so the budget target is not met."""
    bench = bench_copy(tmp_path)
    results = {"llama": model_results("llama", LLAMA, 25000)}
    results["llama"][4]["data"]["nvml_peak_gib"] = 17.1
    done = run_record(bench, write_call(bench / "raw" / "2026-12-01-h200-call01", results))
    assert done.returncode == 0, done.stderr
    row = target_rows((bench / "README.md").read_text(), "16 GiB budget")["llama"]
    assert "NVML 17.1 GiB" in row[3] and row[-1] == "no"


def test_records_and_readme(tmp_path: Path) -> None:
    bench = bench_copy(tmp_path)
    results = {"llama": model_results("llama", LLAMA, 25000)}
    results["deepseek"] = model_results("deepseek", DEEPSEEK, 25000, budget_oom_retries=1)
    cache = {"graphs_from_cache": 2, "graphs_compiled": 0, "seconds": 71.5}  # a compiled run that started warm
    results["llama"][4]["data"] |= {"compiled": True, "kernels": "none", "compile_cache": cache, "mfu": 0.4321}
    results["llama"][4]["data"]["steady_gpu_util_pct"] = 91.5  # after its compile
    folder = write_call(bench / "raw" / "2026-12-01-h200-call01", results)
    done = run_record(bench, folder)
    assert done.returncode == 0, done.stderr

    records = read_records(bench)
    kinds = sorted((r["model"], r["stage"], r["recipe"]) for r in records)
    per_model = [("duel", "default"), ("evaluate", "default"), ("finetune", "baseline-mb16x1")]
    per_model += [("finetune", "budget"), ("finetune", "default")]
    assert kinds == sorted((model, *kind) for model in ("llama", "deepseek") for kind in per_model)
    assert {(r["run"], r["date"], r["gpu"]) for r in records} == {
        ("2026-12-01-h200-call01", "2026-12-01", "NVIDIA H200")
    }
    assert all(r["versions"] == VERSIONS and r["argv"] == "llama deepseek --parallel --budget-gib 16" for r in records)
    baseline = 5120.0 / 512
    for r in records:
        if r["stage"] == "finetune" and not r["recipe"].startswith("baseline"):
            assert r["baseline_reviews_per_s"] == baseline
            assert r["ratio_vs_baseline"] == round(r["reviews_per_s"] / baseline, 3)
        else:
            assert r["ratio_vs_baseline"] is None
    by_key = {(r["model"], r["stage"], r["recipe"]): r for r in records}
    default = by_key["llama", "finetune", "default"]
    assert default["reviews_per_s"] == 52.0 and default["gpu_util_pct"] == 92.5 and default["steps"] == 200
    budget = by_key["llama", "finetune", "budget"]
    assert (budget["outside_torch_gib"], budget["alloc_retries"], default["alloc_retries"]) == (1.3, 2, 0)
    assert default["mfu"] == round(52.0 * 300 * 4 * TOTAL_PARAMETERS / 790e12, 4)  # no checkpointing: 4N a token
    assert by_key["llama", "finetune", "budget"]["checkpointed_layers"] == 28
    assert by_key["llama", "finetune", "budget"]["note"] == "compiled in 71.5 s: 0 graphs compiled, 2 from the cache"
    assert default["note"] == ""
    assert by_key["llama", "finetune", "budget"]["mfu"] == 0.4321  # the stage's own MFU, where it reports one
    assert by_key["llama", "finetune", "budget"]["steady_gpu_util_pct"] == 91.5
    assert default["steady_gpu_util_pct"] is None  # not in that result
    assert by_key["deepseek", "finetune", "budget"]["oom_retries"] == 1
    assert by_key["llama", "finetune", "baseline-mb16x1"]["reviews_per_s"] == baseline
    evaluate = by_key["deepseek", "evaluate", "default"]
    assert (evaluate["test_reviews"], evaluate["reviews_per_s"], evaluate["gpu_util_pct"]) == (25000, 90.0, 88.0)
    duel = by_key["llama", "duel", "default"]
    assert (duel["steps"], duel["test_reviews"], duel["wall_s"]) == (200, 25000, 190.0)
    assert default["stages_s"] == {  # the failed compiled run (exit 1) left out
        "baseline": 50.0,
        "download": 30.0,
        "tokenize": 20.0,
        "finetune_default": 60.0,
        "evaluate": 80.0,
        "finetune_budget": 40.0,
    }

    readme = (bench / "README.md").read_text()
    assert "{{" not in readme
    default_rows = target_rows(readme, "200-step fine-tune")
    assert default_rows["llama"][2:] == ["2026-12-01-h200-call01", "52.0 / 10.0 reviews/s = 5.20x", "92.5", "60", "yes"]
    assert default_rows["deepseek"][3:] == ["55.0 / 10.0 reviews/s = 5.50x", "71.5", "60", "no"]  # not 90% busy
    budget_rows = target_rows(readme, "16 GiB budget")
    assert budget_rows["llama"][-1] == "yes" and budget_rows["deepseek"][-1] == "no"  # 4.0x, but an OOM back-off
    evaluate_rows = target_rows(readme, "evaluate")
    assert evaluate_rows["llama"][-1] == "yes" and evaluate_rows["deepseek"][-1] == "no"
    assert evaluate_rows["deepseek"][3] == "90.0 reviews/s on 25,000 test reviews"
    duel_row = target_rows(readme, "paper-scale duel")["deepseek + llama"]
    assert duel_row[3:] == ["240.0 + 190.0 = 430.0 s = 7.2 min", "—", "—", "yes"]
    # the levers table: a row per project fine-tune
    lever_rows = [line for line in readme.splitlines() if "| 2026-12-01-h200-call01 |" in line and "| varlen " in line]
    assert len(lever_rows) == 4


def test_a_scoring_call_records_each_layout_with_its_start_up_and_mfu(tmp_path: Path) -> None:
    """--scoring: the zero_shot stage's metrics per layout of scoring's batches become scoring records (recipe
    scoring-<layout>, the attention and layout said), listed in the README's scoring table, judged by no target."""
    bench = bench_copy(tmp_path)
    lines = []
    for layout, speed in (("left", 150.0), ("flattened", 165.0)):
        metrics = {"reviews": 5000, "eval_time_s": round(5000 / speed, 2), "eval_reviews_per_s": speed}
        metrics |= {"eval_tokens_per_s": speed * 290.7, "eval_mfu": 0.57, "eval_startup_s": 31.5}
        metrics |= {"eval_gpu_util_mean_pct": 90.0, "eval_nvml_peak_gib": 22.4, "eval_peak_vram_reserved_gib": 21.1}
        attention = "varlen" if layout == "flattened" else "sdpa"
        data = metrics | {"accuracy": 0.5, "attention": attention, "padding": layout, "stage_s": 70.0}
        lines.append({"kind": "scoring", "model": "llama", "tag": layout, "data": data})
    folder = bench / "raw" / "2026-12-09-h100-call01"
    folder.mkdir(parents=True)
    (folder / "gpu.csv").write_text(
        "name, driver_version, memory.total [MiB]\nNVIDIA H100 80GB HBM3, 580.0, 81559 MiB\n"
    )
    (folder / "versions.json").write_text(json.dumps(VERSIONS))
    call = {"kind": "call", "model": "llama", "tag": "argv", "data": {"argv": ["llama", "--scoring", "5000"]}}
    (folder / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in [call, *lines]))
    done = run_record(bench, folder)
    assert done.returncode == 0, done.stderr

    records = {r["recipe"]: r for r in read_records(bench)}
    assert sorted(records) == ["scoring-flattened", "scoring-left"]
    flattened = records["scoring-flattened"]
    assert (flattened["stage"], flattened["attention"], flattened["note"]) == ("scoring", "varlen", "flattened rows")
    assert (flattened["reviews_per_s"], flattened["mfu"], flattened["startup_s"]) == (165.0, 0.57, 31.5)
    assert (flattened["test_reviews"], flattened["tokens_per_s"], flattened["gpu_util_pct"]) == (
        5000,
        165.0 * 290.7,
        90.0,
    )
    readme = (bench / "README.md").read_text()
    table = readme.split("## Scoring")[1].split("## ")[0]
    rows = [cells(line) for line in table.splitlines() if line.startswith("| llama ")]
    assert [row[1] for row in rows] == ["scoring-flattened", "scoring-left"]
    assert all(row[2] == "2026-12-09-h100-call01" for row in rows)
    assert target_rows(readme, "evaluate")["llama"][3] == "not measured"  # scoring runs judge no target


def test_newest_call_judges_and_a_rerun_replaces(tmp_path: Path) -> None:
    bench = bench_copy(tmp_path)
    first = write_call(bench / "raw" / "2026-12-01-h200-call01", {"llama": model_results("llama", LLAMA, 25000)})
    faster = LLAMA | {"default": 41.0, "evaluate": 80.0}  # scored on 1,000 reviews: not judged
    second = write_call(bench / "raw" / "2026-12-01-h200-call02", {"llama": model_results("llama", faster, 1000)})
    for folders in ((first, second), (second,)):
        assert run_record(bench, *folders).returncode == 0
    records = read_records(bench)
    assert [r["run"][-6:] for r in records].count("call02") == 5  # the rerun replaced call02's records
    assert [r["run"][-6:] for r in records].count("call01") == 5

    readme = (bench / "README.md").read_text()
    assert target_rows(readme, "200-step fine-tune")["llama"][2:4] == [
        "2026-12-01-h200-call02",
        "41.0 / 10.0 reviews/s = 4.10x",
    ]
    assert target_rows(readme, "evaluate")["llama"][2] == "2026-12-01-h200-call01"  # the newest with 3,000 or more
    assert target_rows(readme, "paper-scale duel")["llama"][2:4] == [
        "2026-12-01-h200-call01",
        "190.0 = 190.0 s = 3.2 min",
    ]

    # without a folder it renders the README alone, from records.jsonl as it is
    records_text = (bench / "records.jsonl").read_text()
    (bench / "README.md").unlink()
    assert run_record(bench).returncode == 0
    assert (bench / "README.md").read_text() == readme and (bench / "records.jsonl").read_text() == records_text


def test_a_200_step_sweep_of_the_default_params_is_judged_as_the_default(tmp_path: Path) -> None:
    bench = bench_copy(tmp_path)
    first = write_call(bench / "raw" / "2026-12-01-h200-call01", {"llama": model_results("llama", LLAMA, 25000)})
    lines = [line for line in model_results("llama", LLAMA, 25000) if line["kind"] == "baseline"]
    for tag, steps, reviews_per_s in (("sweep-default", 200, 30.0), ("sweep-4bit", 200, 60.0)):
        lines.append(
            {"kind": "finetune", "model": "llama", "tag": tag, "data": finetune("llama", reviews_per_s, steps, None, 0)}
        )
    second = bench / "raw" / "2026-12-01-h200-call02"
    second.mkdir(parents=True)
    for name in ("gpu.csv", "versions.json"):
        (second / name).write_text((first / name).read_text())
    (second / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert run_record(bench, first, second).returncode == 0

    row = target_rows((bench / "README.md").read_text(), "200-step fine-tune")["llama"]
    assert row[2:4] == ["2026-12-01-h200-call02", "30.0 / 10.0 reviews/s = 3.00x"]  # not the other variant
    assert row[-1] == "no"


def test_misnamed_call_folder_is_refused(tmp_path: Path) -> None:
    bench = bench_copy(tmp_path)
    folder = write_call(bench / "raw" / "2026-12-01-h200-second", {"llama": model_results("llama", LLAMA, 25000)})
    done = run_record(bench, folder)
    assert done.returncode != 0 and "<date>-<gpu>-call<NN>" in done.stderr
    assert not (bench / "records.jsonl").exists()


def test_committed_readme_is_rendered_from_committed_records(tmp_path: Path) -> None:
    bench = bench_copy(tmp_path)
    shutil.copy(REPO / "benchmarks" / "records.jsonl", bench / "records.jsonl")
    done = run_record(bench)
    assert done.returncode == 0, done.stderr
    assert (bench / "README.md").read_text() == (REPO / "benchmarks" / "README.md").read_text()
    runs = {r["run"] for r in read_records(bench)}
    assert runs == {p.name for p in (REPO / "benchmarks" / "raw").iterdir()}  # every record from a raw folder


def test_two_finetunes_sharing_one_gpu(tmp_path: Path) -> None:
    """run_device.py --together: each model's 50 steps alone, then both at once; a pair record per way."""
    bench = bench_copy(tmp_path)
    folder = bench / "raw" / "2026-12-02-h200-call01"
    folder.mkdir()
    (folder / "gpu.csv").write_text("name, driver_version, memory.total [MiB]\nNVIDIA H200, 580.0, 143771 MiB\n")
    (folder / "versions.json").write_text(json.dumps(VERSIONS))
    baseline = {"quant": "nf4-dq", "micro_batch": 16, "accum": 1, "grad_ckpt": True, "seq": 512, "step_s": 1.6}
    baseline |= {"tokens_per_s": 5120.0, "peak_reserved_gib": 15.9}
    lines = [("call", "llama,deepseek", "argv", {"argv": ["llama", "deepseek", "--together", "50"]})]
    lines += [("baseline", m, "mb16x1", baseline) for m in ("llama", "deepseek")]
    alone = {"llama": (30.0, 60.0), "deepseek": (40.0, 70.0)}  # reviews/s, GPU utilization
    lines += [
        ("finetune", m, "alone", finetune(m, s, 50, None, 0) | {"gpu_util_mean_pct": u}) for m, (s, u) in alone.items()
    ]
    lines.append(("pair", "llama+deepseek", "in-turn", {"wall_s": 96.0, "reviews": 1600, "steps": 50}))
    lines += [("finetune", m, "together", finetune(m, 20.0, 50, None, 0) | {"gpu_util_mean_pct": 95.0}) for m in alone]
    lines.append(("pair", "llama+deepseek", "together", {"wall_s": 64.0, "reviews": 1600, "steps": 50}))
    results = [{"kind": k, "model": m, "tag": t, "data": d} for k, m, t, d in lines]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    log = "".join(f"==== finetune_{m}_{way}: exit 0 in 45.0 s\n" for way in ("alone", "together") for m in alone)
    (folder / "log.txt").write_text(log)
    done = run_record(bench, folder)
    assert done.returncode == 0, done.stderr

    pairs = {r["recipe"]: r for r in read_records(bench) if r["stage"] == "pair"}
    assert pairs["in-turn"]["model"] == "llama+deepseek" and pairs["in-turn"]["reviews_per_s"] == round(1600 / 96, 3)
    # utilization weighted by training time: llama trained 800 reviews in 26.67 s at 60%, deepseek in 20 s at 70%
    assert pairs["in-turn"]["gpu_util_pct"] == round((60 * 800 / 30 + 70 * 800 / 40) / (800 / 30 + 800 / 40), 1)
    assert pairs["together"]["gpu_util_pct"] == 95.0 and pairs["together"]["wall_s"] == 64.0
    readme = (bench / "README.md").read_text()
    rows = [cells(line) for line in readme.splitlines() if line.startswith("| 2026-12-02-h200-call01 |")]
    assert [(row[1], row[2], row[3], row[-1]) for row in rows] == [
        ("pair", "llama+deepseek", "in-turn", ""),
        ("finetune", "llama", "alone", ""),
        ("finetune", "deepseek", "alone", ""),
        ("pair", "llama+deepseek", "together", "1.50x the speed of in-turn"),
        ("finetune", "llama", "together", ""),
        ("finetune", "deepseek", "together", ""),
    ]
    assert not any("| together |" in line and "| varlen " in line for line in readme.splitlines())  # not a lever
    assert set(target_rows(readme, "evaluate")) == {"llama", "deepseek"}  # a pair is no model of its own


def test_the_peer_budget_by_budget(tmp_path: Path) -> None:
    """run_device.py --peer: the finetune stage and benchmarks/peer.py at each budget; a row per budget with the peer's
    fastest way within it, and the plain stack only where its one configuration fits."""
    bench = bench_copy(tmp_path)
    folder = bench / "raw" / "2026-12-05-h200-call01"
    folder.mkdir()
    (folder / "gpu.csv").write_text("name, driver_version, memory.total [MiB]\nNVIDIA H200, 580.0, 143771 MiB\n")
    (folder / "versions.json").write_text(json.dumps(VERSIONS))
    baseline = {"quant": "nf4-dq", "micro_batch": 16, "accum": 1, "grad_ckpt": True, "seq": 512, "step_s": 1.6}
    baseline |= {"tokens_per_s": 5120.0, "peak_reserved_gib": 15.9}
    project = {8.0: 20.0, None: 40.0}  # steady reviews/s
    lines = [("baseline", "mb16x1", baseline)]
    lines += [
        ("finetune", f"budget-{b or 'none'}", finetune("llama", s - 5, 20, b, 0) | {"steady_reviews_per_s": s})
        for b, s in project.items()
    ]
    peer = {"steps": 20, "tokens_per_s": 6000.0, "padded_tokens_per_s": 10000.0, "gpu_util_mean_pct": 98.0}
    peer |= {"micro_batch": 16, "oom_retries": 0, "peak_vram_reserved_gib": 7.0, "impl": "unsloth"}
    peer |= {"nvml_peak_gib": 7.9}  # within 8 GiB on the card, where the project's 15.8 is over its budget
    ways = [("unsloth", 8.0, 16.0), ("unsloth", None, 16.0), ("none", None, 32.0)]  # checkpointing, budget, steady
    lines += [
        (
            "peer",
            f"budget-{b or 'none'}-{c}",
            peer | {"checkpointing": c, "memory_budget_gib": b} | {"reviews_per_s": s - 1, "steady_reviews_per_s": s},
        )
        for c, b, s in ways
    ]
    results = [{"kind": k, "model": "llama", "tag": t, "data": d} for k, t, d in lines]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    (folder / "log.txt").write_text("")
    done = run_record(bench, folder)
    assert done.returncode == 0, done.stderr

    records = {(r["stage"], r["recipe"], r["memory_budget_gib"]): r for r in read_records(bench)}
    assert records["finetune", "budget", 8.0]["steady_reviews_per_s"] == 20.0
    unsloth = records["peer", "unsloth", 8.0]
    assert (unsloth["gradient_checkpointing"], unsloth["padding_share"], unsloth["quantization"]) == (
        True,
        0.4,
        "nf4-dq",
    )
    assert unsloth["ratio_vs_baseline"] == round(15.0 / 10.0, 3) and unsloth["wall_s"] == round(20 * 16 / 15.0, 2)
    assert records["peer", "unsloth-no-ckpt", None]["gradient_checkpointing"] is False

    readme = (bench / "README.md").read_text()
    rows = {row[1]: row for row in map(cells, readme.splitlines()) if row[2:3] == ["2026-12-05-h200-call01"]}
    assert rows["8.0"][3:] == [
        "20.0 (14.5 / 15.8 GiB over budget, 72% busy)",
        "16.0 (7.0 / 7.9 GiB, 98% busy, mb 16)",
        "needs 15.9 GiB",
        "1.25x",
        "—",
    ]
    no_ckpt = "32.0 (7.0 / 7.9 GiB, 98% busy, mb 16, no ckpt)"
    assert rows["whole GPU"][4:] == [no_ckpt, "10.0 (15.9 GiB)", "1.25x", "4.00x"]
    # 1.25x at both budgets, but over the 8 GiB budget on the card: the target against the peer is not met.
    target = target_rows(readme, "against Unsloth")["llama"]
    assert target[3] == "1.25x at its lowest (8 GiB); over budget on the card at: 8" and target[-1] == "no"


def test_every_variant_of_the_runner_is_params_the_stages_accept(raw_params: dict[str, Any]) -> None:
    """A variant the params refuse would fail on the GPU machine after the call's start-up; refuse it here."""
    spec = importlib.util.spec_from_file_location("run_device", REPO / "benchmarks" / "run_device.py")
    assert spec is not None and spec.loader is not None
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    device = overlay(raw_params, yaml.safe_load((REPO / "benchmarks" / "profiles" / "h200.yaml").read_text()))
    paper = overlay(device, yaml.safe_load((REPO / "profiles" / "paper.yaml").read_text()))
    refused = {}
    variants = [(device, name, sections) for name, sections in runner.SWEEP.items()]
    variants += [(paper, f"ablation-{name}", sections) for name, sections in runner.ABLATION.items()]
    for under, name, sections in variants:
        merged = copy.deepcopy(under)
        for section, values in sections.items():
            if section != "env":
                merged[section] = merged[section] | values
        try:
            parse_params(merged)
        except ParamsError as err:
            refused[name] = str(err)
    assert not refused, refused
