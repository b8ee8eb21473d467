"""The demo end to end, as a user runs it: `make demo` (with the shared folder somewhere else) in a fresh copy of the
repository, then the experiments a DVC user runs next, asserting on what DVC says it re-ran and on the metrics,
plots and report the stages write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import yaml
from project_copy import clone, copy_sources

from duel.profile import apply

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
pytestmark = pytest.mark.slow
STAGES = [
    "download",
    "base_llama",
    "base_deepseek",
    "tokenize",
    "zero_shot_llama",
    "zero_shot_deepseek",
    "finetune_llama",
    "finetune_deepseek",
    "evaluate",
    "report",
]


def env() -> dict[str, str]:
    return os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_CACHE": str(SHARED / "hf" / "hub"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }


def run(cmd: list[str], cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def ran(log: str) -> list[str]:
    """The stages DVC ran, from its own log, in dvc.yaml's order; every other stage must say it was skipped."""
    running = [stage for stage in STAGES if f"Running stage '{stage}'" in log]
    skipped = [stage for stage in STAGES if f"Stage '{stage}' didn't change, skipping" in log]
    assert sorted(running + skipped) == sorted(STAGES), log[-3000:]
    return running


def status_with(repo: Path, name: str, text: str) -> dict:
    """`dvc status --json` while the file `name` holds `text`; the file is given back as it was."""
    path = repo / name
    original = path.read_text()
    path.write_text(text)
    try:
        return json.loads(run(["dvc", "status", "--json"], repo))
    finally:
        path.write_text(original)


def read(repo: Path, name: str) -> dict:
    return json.loads((repo / name).read_text())


def take_snapshot(repo: Path, base: Path) -> None:
    """A clone of `repo` as it is now under `base` (base/project), with the shared folder beside it under the name the
    copy's experiments were run with."""
    clone(repo, base)
    (base / "elsewhere").symlink_to(SHARED)


def make_demo(base: Path, snapshot: Path) -> tuple[Path, str]:
    """A copy of the working tree under `base`, committed, with `make demo SHARED=<another folder>` run in it (the
    project's virtual environment reused as it is); the copy and make's output. A clone of it as the demo leaves it
    goes under `snapshot`, for the experiments after the demo, before a test reads or edits the copy."""
    repo = copy_sources(base)
    (base / "elsewhere").symlink_to(SHARED)  # the shared folder under another name, as a user may have it
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    run(["git", "init", "-q"], repo)
    run([*git, "add", "-A"], repo)
    run([*git, "commit", "-qm", "copy"], repo)
    # -o: the environment is the project's own, never rebuilt from the copy (an install there would point the
    # project's editable install at the copy).
    venv = ROOT / ".venv"
    log = run(["make", "-o", str(venv / ".installed"), "demo", f"SHARED={base / 'elsewhere'}", f"VENV={venv}"], repo)
    take_snapshot(repo, snapshot)
    return repo, log


def rerun_after_the_demo(demo: Future, base: Path, snapshot: Path) -> tuple[Path, str]:
    """In the clone of the demo under `base` (make_demo's snapshot), once the demo is done: an experiment that
    changes LoRA's rank and the prompt; the clone and DVC's log. A clone of it as the experiment leaves it goes under
    `snapshot`, for the seed study, before a test reads or edits the clone."""
    demo.result()
    repo = base / "project"
    prompt = "data.prompt='Text: {review} Sentiment:'"
    log = run(["dvc", "exp", "run", "-n", "rank8", "-S", "lora.r=8", "-S", prompt], repo)
    take_snapshot(repo, snapshot)
    return repo, log


def seed_study_after_the_rerun(rerun: Future, base: Path) -> tuple[Path, str]:
    """`make seeds N=2 JOBS=2 ARGS=...` in the clone under `base` (rerun_after_the_demo's snapshot), once the rerun is
    done; the clone and make's output."""
    rerun.result()
    repo = base / "project"
    venv = ROOT / ".venv"
    shared = repo.parent / "elsewhere"
    make = ["make", "-o", str(venv / ".installed"), "seeds", "N=2", "JOBS=2", f"SHARED={shared}", f"VENV={venv}"]
    make.append("ARGS=-S train.steps=6")  # a shorter study: what is checked is the study, not the training
    return repo, run(make, repo)


def start_experiments(
    pool: ThreadPoolExecutor, tmp_path_factory: pytest.TempPathFactory, needed: set[str]
) -> dict[str, Future]:
    """The demo, the experiment after it and the seed study after that, as far as the fixtures `needed` go, each in a
    copy of its own (the next one starts from a clone of the last one's end), on `pool`'s threads: processes only."""
    bases = [tmp_path_factory.mktemp(name) for name in ("clone", "rerun", "seeds")]
    started = {"demo": pool.submit(make_demo, bases[0], bases[1])}
    if needed & {"rerun", "seed_study"}:
        started["rerun"] = pool.submit(rerun_after_the_demo, started["demo"], bases[1], bases[2])
    if "seed_study" in needed:
        started["seed_study"] = pool.submit(seed_study_after_the_rerun, started["rerun"], bases[2])
    return started


@pytest.fixture(scope="module")
def demo(started_early: dict[str, Future]) -> tuple[Path, str]:
    """make_demo's copy and make's output (started with the session: conftest.started_early)."""
    return started_early["demo"].result()


@pytest.fixture(scope="module")
def rerun(started_early: dict[str, Future]) -> tuple[Path, str]:
    """rerun_after_the_demo's clone and DVC's log (started with the session)."""
    return started_early["rerun"].result()


@pytest.fixture(scope="module")
def seed_study(started_early: dict[str, Future]) -> tuple[Path, str]:
    """seed_study_after_the_rerun's clone and make's output (started with the session)."""
    return started_early["seed_study"].result()


def test_demo_is_a_named_experiment_from_another_shared_folder(demo: tuple[Path, str]) -> None:
    repo, log = demo
    assert "Ran experiment(s): demo" in log
    assert ran(log) == STAGES
    assert "demo" in run(["dvc", "exp", "list", "--name-only"], repo)
    source = read(repo, "data/source.json")["source"]
    assert Path(source).is_absolute() and "/elsewhere/" in source  # SHARED as given, usable from any folder
    assert "| llama | finetuned |" in log  # the terminal summary


def test_demo_metrics_cover_both_models_and_baselines(demo: tuple[Path, str]) -> None:
    repo, _ = demo
    evaluate = read(repo, "metrics/evaluate.json")
    assert set(evaluate) == {"llama", "deepseek"}
    for key in evaluate:
        zero_shot = read(repo, f"metrics/zero_shot_{key}.json")[key]["zero_shot"]
        for metrics in (evaluate[key], zero_shot):
            for name in ("accuracy", "f1", "precision", "recall", "roc_auc"):
                assert 0.0 <= metrics[name] <= 1.0, (key, name)
            assert metrics["reviews"] == 400 and metrics["eval_peak_memory_gib"] > 0
            assert metrics["eval_tokens_per_s"] > metrics["eval_reviews_per_s"] and metrics["eval_mfu"] is None
            assert 0 < metrics["eval_startup_s"] < 600  # evaluate's second model: from the first one's end
            assert 0 < metrics["eval_load_s"] < metrics["eval_startup_s"]
        assert zero_shot["eval_startup_s"] > 0.5  # from the process's start: the imports at least
        finetune = read(repo, f"metrics/finetune_{key}.json")[key]
        assert finetune["steps"] == 20 and finetune["reviews_per_s"] > 0
        assert 0.5 < finetune["startup_s"] < 600 and 0 < finetune["load_s"] < finetune["startup_s"]
        assert finetune["peak_memory_gib"] > 0 and finetune["peak_vram_allocated_gib"] is None  # RSS: no GPU here
        run_info = read(repo, f"models/adapters/{key}/training.json")["run"]
        assert run_info["quantization"] == "nf4-dq" and run_info["device"] == "cpu"
        assert run_info["allocator"] == os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        scoring = read(repo, f"data/predictions/{key}_finetuned/scoring.json")
        assert sum(map(sum, scoring["confusion_matrix"])) == 400
    assert read(repo, "metrics/data.json")["reviews"]["train"]["labels"] == {"0": 160, "1": 160}


def test_metrics_files_hold_numbers_only(demo: tuple[Path, str]) -> None:
    repo, _ = demo

    def leaves(tree: object) -> list[object]:
        return [v for sub in tree.values() for v in leaves(sub)] if isinstance(tree, dict) else [tree]

    for path in sorted((repo / "metrics").glob("*.json")):
        kinds = {type(v).__name__ for v in leaves(json.loads(path.read_text()))}
        assert kinds <= {"int", "float", "NoneType"}, (path.name, kinds)


def test_demo_per_step_series_and_dvc_plots(demo: tuple[Path, str]) -> None:
    repo, _ = demo
    for key in ("llama", "deepseek"):
        for series in ("loss", "label_word_loss", "memory_gib", "tokens_per_s"):
            frame = pd.read_csv(repo / f"plots/{key}/plots/metrics/{series}.tsv", sep="\t")
            assert frame["step"].max() == 20 and frame[series].notna().all(), (key, series)
    loss = pd.read_csv(repo / "plots/llama/plots/metrics/loss.tsv", sep="\t")["loss"]
    assert loss.iloc[-1] < loss.iloc[0]  # LoRA learns to say one of the two label words
    plots = json.loads(run(["dvc", "plots", "show", "--json"], repo))["data"]
    for title, column in (("Training loss", "loss"), ("Label-word", "label_word_loss"), ("Memory", "memory_gib")):
        (name,) = [n for n in plots if n.startswith(title)]
        values = plots[name][0]["content"]["data"]["values"]
        drawn = {v["filename"].split("/")[0] for v in values if v.get(column) not in (None, "")}
        assert drawn == {"llama", "deepseek"}, (title, drawn)  # both models on one chart
    assert any(n.startswith("Confusion, llama") for n in plots)
    for figure in ("accuracy", "confusion", "throughput", "cost"):  # the report's figures, as images
        assert plots[f"plots/report/{figure}.png"][0]["type"] == "image", figure


def test_demo_report(demo: tuple[Path, str]) -> None:
    repo, _ = demo
    report = (repo / "reports/report.md").read_text()
    assert "had random weights" in report
    assert report.count("| llama | ") >= 3 and report.count("| deepseek | ") >= 3  # quality x2 + hardware
    assert "0.924" in report and "0.85" in report  # the paper's claims are quoted beside ours
    peers = report.split("### Against Unsloth, budget by budget")[1]  # from benchmarks/records.jsonl
    assert "| llama " in peers and "| deepseek " in peers and "whole GPU" in peers and "nan" not in peers
    for figure in ("loss", "memory", "throughput", "accuracy", "confusion", "cost"):
        assert (repo / f"plots/report/{figure}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"](../plots/report/{figure}.png)" in report  # embedded, relative to the report


def test_lora_change_reaches_the_finetunes_only(demo: tuple[Path, str]) -> None:
    """Not the data, the base models, the tokens, nor the zero-shot scores: none of them depends on LoRA (the report
    states every param); DVC then re-runs what follows the fine-tunes."""
    repo, _ = demo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    status = status_with(repo, "params.yaml", yaml.safe_dump(apply(params, {"lora.r": 2 * params["lora"]["r"]})))
    assert sorted(status) == sorted(["finetune_llama", "finetune_deepseek", "report"])
    assert all({"changed deps": {"params.yaml": {"lora": "modified"}}} in status[s] for s in status if s != "report")


def test_lora_and_prompt_change_rerun_the_tokens_and_everything_after(rerun: tuple[Path, str]) -> None:
    repo, log = rerun
    assert ran(log) == STAGES[3:]
    diff = json.loads(run(["dvc", "exp", "diff", "demo", "rank8", "--json"], repo))
    assert diff["params"]["params.yaml"]["lora.r"] == {"old": 16, "new": 8, "diff": -8}
    metrics = json.loads(run(["dvc", "metrics", "diff", "demo", "--json"], repo))
    assert metrics["metrics/finetune_llama.json"]["llama.trainable_parameters"]["diff"] == -46080  # r 16 -> 8
    trained_on = read(repo, "models/adapters/llama/training.json")["params"]["data"]["prompt"]
    assert trained_on == "Text: {review} Sentiment:"  # the adapter scored is the one trained under the new prompt


def test_scoring_change_reruns_the_scoring_only(rerun: tuple[Path, str]) -> None:
    """A scoring param is read by the scoring stages and the report (which states it) only: `dvc status` names
    them and no fine-tune."""
    repo, _ = rerun
    assert "up to date" in run(["dvc", "status"], repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    status = status_with(repo, "params.yaml", yaml.safe_dump(apply(params, {"execution.eval_batch_size": 25})))
    assert sorted(status) == sorted(["zero_shot_llama", "zero_shot_deepseek", "evaluate", "report"])
    changed = {"changed deps": {"params.yaml": {"execution.eval_batch_size": "modified"}}}
    assert all(changed in status[stage] for stage in ("zero_shot_llama", "zero_shot_deepseek", "evaluate")), status
    assert {"changed deps": {"params.yaml": {"execution": "modified"}}} in status["report"]  # it reads every param


def test_editing_a_module_shows_in_dvc_status(rerun: tuple[Path, str]) -> None:
    """duel/attention.py is imported by model loading: both fine-tunes and all scoring depend on it, the rest not."""
    repo, _ = rerun
    assert "up to date" in run(["dvc", "status"], repo)
    status = status_with(repo, "duel/attention.py", (repo / "duel" / "attention.py").read_text() + "\n# edited\n")
    assert sorted(status) == sorted(
        ["zero_shot_llama", "zero_shot_deepseek", "finetune_llama", "finetune_deepseek", "evaluate"]
    )
    assert all({"changed deps": {"duel/attention.py": "modified"}} in status[stage] for stage in status)


def test_compare_fits_a_terminal(rerun: tuple[Path, str]) -> None:
    """make compare: the experiments, what differs between them, and each model's headline figures in 200 columns."""
    repo, _ = rerun
    shown = run([sys.executable, "-m", "duel.compare"], repo)
    lines = shown.splitlines()
    assert max(map(len, lines)) <= 200, shown
    assert "llama" in lines[0] and "deepseek" in lines[0]
    row = next(line for line in lines if line.lstrip().startswith("rank8"))
    assert "lora.r=8" in row
    demo_row = next(line for line in lines if line.lstrip().startswith("demo "))
    accuracy = read(repo, "metrics/evaluate.json")["llama"]["accuracy"]  # the workspace: the last run
    workspace = next(line for line in lines if line.lstrip().startswith("workspace "))
    assert f"{accuracy:.3f}" in workspace and len(demo_row.split()) >= 11


def test_seed_study_runs_in_parallel(seed_study: tuple[Path, str]) -> None:
    """`make seeds N=2 JOBS=2 ARGS=...`: two queued experiments that differ in seeds.train only, run at once by
    `dvc queue start -j 2` (each in its own copy of the project, where only absolute paths and the environment reach
    ../shared), then aggregated into studies/seeds-train/."""
    repo, log = seed_study  # after the demo and the rerun
    assert "seeds: queued seed-train1 (seeds.train=1)" in log and "seeds: queued seed-train2" in log
    runs = pd.read_csv(repo / "studies" / "seeds-train" / "runs.csv")
    assert sorted(runs["seed"].unique()) == [1, 2] and set(runs["model"]) == {"llama", "deepseek"}
    accuracy = runs.pivot(index="seed", columns="model", values="accuracy")
    assert runs["accuracy"].between(0, 1).all()
    study = (repo / "studies" / "seeds-train" / "report.md").read_text()
    assert "differ in `seeds.train` only (1, 2)" in study and "Gap (deepseek minus llama, accuracy)" in study
    assert f"| 1 | {accuracy.loc[1, 'llama']:.3f} |" in study
    assert (repo / "studies" / "seeds-train" / "accuracy.png").stat().st_size > 10_000
