"""A copy of the working tree beside ../shared, with a params.yaml of our choosing, to run the stages in by
subprocess (no DVC). The crash/resume, determinism and secrets tests share it."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from duel.profile import apply, overlay

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# The demo profile, shortened: 12 steps x 16 reviews, a checkpoint every 4 steps, 40 test reviews; llama only.
SMALL_RUN = {"train.steps": 12, "execution.save_steps": 4, "data.train_size": 12 * 16, "data.test_size": 40}
# What the stages write: never copied, so a copy starts from sources only, whatever the working tree holds.
OUTPUTS = ("data/", "models/", "metrics/", "plots/", "reports/", "checkpoints/", "dvc.lock")
ADAPTER = Path("models/adapters/llama/adapter_model.safetensors")
PIPELINE = [
    ("download",),
    ("base", "llama"),
    ("tokenize",),
    ("zero_shot", "llama"),
    ("finetune", "llama"),
    ("evaluate",),
    ("report",),
]


def stage_name(stage: tuple[str, ...]) -> str:
    """The dvc.yaml name of a PIPELINE entry: ("base", "llama") -> base_llama."""
    return "_".join(stage)


@dataclass(frozen=True)
class StageRun:
    repo: Path
    log: str
    """stdout + stderr of every stage run, in order."""
    traces: Path | None = None
    """The folder of each stage's strace of the files it opened, where the run was traced."""


def committed_params() -> dict[str, Any]:
    """params.yaml as committed (HEAD): the paper's experiment, whatever an experiment left in the working copy."""
    text = subprocess.run(
        ["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return yaml.safe_load(text)


def copy_sources(base: Path) -> Path:
    """base/project: the tracked and untracked files of the working tree except OUTPUTS, with the committed
    params.yaml; base/shared -> ../shared."""
    repo = base / "project"
    (base / "shared").symlink_to(SHARED)
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file() and not name.startswith(OUTPUTS):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(committed_params(), sort_keys=False))
    return repo


def make_copy(base: Path, overrides: dict[str, Any], models: tuple[str, ...] = ("llama",)) -> Path:
    """base/project: the tracked and untracked files of the working tree except OUTPUTS, base/shared -> ../shared,
    and params.yaml = the committed params.yaml + profiles/demo.yaml + `overrides` (dotted names), keeping only
    `models`; data from ../shared by its absolute path."""
    repo = copy_sources(base)
    demo = overlay(committed_params(), yaml.safe_load((ROOT / "profiles" / "demo.yaml").read_text()))
    merged = apply(demo, {"data.source": str(SHARED / "data" / "imdb")} | overrides)
    merged["models"] = {key: merged["models"][key] for key in models}
    (repo / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    return repo


def clone(repo: Path, base: Path) -> Path:
    """Another copy of a project copy, in the state it is in (outputs and checkpoints included)."""
    (base / "shared").symlink_to(SHARED)
    shutil.copytree(repo, base / "project", symlinks=True)
    return base / "project"


def set_params(repo: Path, overrides: dict[str, Any]) -> None:
    """Apply `overrides` (dotted names) to the copy's params.yaml."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(apply(params, overrides), sort_keys=False))


def ready_to_finetune(run: Path, base: Path, overrides: dict[str, Any] | None = None) -> Path:
    """A clone of the copy `run` holding, of its outputs, only what the fine-tune reads (data/ without predictions,
    models/base/: what download, base and tokenize wrote), with `overrides` applied to its params.yaml."""
    repo = clone(run, base)
    for output in ("models/adapters", "checkpoints", "metrics", "plots", "reports", "data/predictions"):
        shutil.rmtree(repo / output, ignore_errors=True)
    (repo / "dvc.lock").unlink(missing_ok=True)
    set_params(repo, overrides or {})
    return repo


def stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Offline hub and data sets, the venv's python first on PATH, no hub token unless `extra` sets one."""
    inherited = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    return inherited | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_CACHE": str(SHARED / "hf" / "hub"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        **(extra or {}),
    }


def stage_command(stage: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"stages.{stage}", *args]


def strace(trace: Path) -> list[str]:
    """The prefix that runs a command under strace, its file opens (and its children's) written to `trace`;
    --seccomp-bpf: only the traced calls stop the process (imports 4x faster under strace than without it)."""
    return ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=open,openat", "-o", str(trace)]


def run_stage(repo: Path, stage: str, *args: str, env: dict[str, str] | None = None, trace: Path | None = None) -> str:
    """Run one stage in `repo` (under strace into `trace` if given); fail the test with its output if it fails.
    Returns its stdout + stderr."""
    command = [*(strace(trace) if trace else []), *stage_command(stage, *args)]
    done = subprocess.run(command, cwd=repo, env=env or stage_env(), capture_output=True, text=True)
    assert done.returncode == 0, f"{stage} {args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def run_in_process(repo: Path, stage: str, *args: str) -> int:
    """A stage's entry point called in the test process, as `python -m stages.<stage> args` run in `repo` calls it
    (the same code: a copy's sources are the working tree's), without a new interpreter's seconds of imports; its
    exit status. The caller captures its output (capfd). The hub client reads its environment when imported: a stage
    that must see another endpoint gets it through the client's constants (test_error_paths.hub_client_online)."""
    from duel import cli

    module = importlib.import_module(f"stages.{stage}")
    argv, cwd = sys.argv, Path.cwd()
    sys.argv = [str(repo / "stages" / f"{stage}.py"), *args]
    os.chdir(repo)
    try:
        cli.run(module.main)
    except SystemExit as exit:
        return int(exit.code or 0)
    finally:
        sys.argv = argv
        os.chdir(cwd)
    return 0


def run_stages_in_process(repo: Path, *stages: tuple[str, ...]) -> None:
    """Each stage's entry point in turn, in the test process (run_in_process); fail the test if one fails (its
    output is in the test's captured output)."""
    for stage in stages:
        assert run_in_process(repo, *stage) == 0, f"{' '.join(stage)} failed in {repo}"


def run_stage_in_process(repo: Path, stage: str, *args: str) -> str:
    """run_in_process, failing the test with the stage's output if it fails. Returns what the stage printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = run_in_process(repo, stage, *args)
    assert code == 0, f"{stage} {args} failed:\n{printed.getvalue()[-3000:]}"
    return printed.getvalue()


def run_pipeline(
    base: Path, env: dict[str, str] | None = None, traces: Path | None = None, in_process: bool = False
) -> StageRun:
    """Every stage of a SMALL_RUN copy, in dvc.yaml's order: each a process of its own, under strace into
    traces/<dvc stage name>.strace if `traces` is given (tests/test_dag.py reads them); or, `in_process`, each
    stage's entry point called in the test process."""
    repo = make_copy(base, SMALL_RUN)
    if traces:
        traces.mkdir(parents=True, exist_ok=True)
    log = ""
    for stage in PIPELINE:
        if in_process:
            log += run_stage_in_process(repo, *stage)
        else:
            trace = traces / f"{stage_name(stage)}.strace" if traces else None
            log += run_stage(repo, *stage, env=env, trace=trace)
    return StageRun(repo, log, traces)


def assert_same_adapter(repo: Path, reference: Path) -> None:
    """Bit-identical LoRA weights; on a mismatch the message gives the largest difference per tensor."""
    weights, expected = load_file(repo / ADAPTER), load_file(reference / ADAPTER)
    assert weights.keys() == expected.keys() and len(weights) > 0
    differences = {name: (weights[name] - expected[name]).abs().max().item() for name in expected}
    assert all(torch.equal(weights[name], expected[name]) for name in expected), (
        f"largest difference {max(differences.values())}: {differences}"
    )
