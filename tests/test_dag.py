"""dvc.yaml is the contract: every stage declares every project file it imports and every file it reads. Checked two
ways: from the code (each stage script's import closure within the project) and by running each stage under
strace in a copy of the project and matching every file it opened against its deps and outs."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import yaml
from dag import import_closure, stage_module, stages
from project_copy import PIPELINE, StageRun, stage_name

# Read by a stage without being a dependency, each for a reason:
RUNTIME = (
    "params.yaml",  # its keys are declared under params:, one by one
    ".cache/",  # download's cache of a downloaded tarball (the tarball's checksum is checked and recorded)
    "checkpoints/",  # a fine-tune's own checkpoints, resumed after a crash and removed when it ends
    ".git/",  # DVCLive looks up the commit it runs on
    ".dvc/",  # and the DVC repository around it,
    ".dvcignore",  # with the files it ignores
)
# The project folder itself: Python lists it to find the `stages` package (python -m runs from it).
ROOT_FOLDER = "."


def declared(stage: dict, key: str) -> list[str]:
    """The paths of a stage's deps or outs (outs and metrics are mappings when they carry options)."""
    entries = stage.get(key, [])
    return [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]


@pytest.mark.parametrize("name", list(stages()))
def test_deps_name_every_module_the_stage_imports(name: str) -> None:
    stage = stages()[name]
    code = {dep for dep in declared(stage, "deps") if dep.endswith(".py")}
    closure = import_closure(stage_module(stage["cmd"]))
    assert closure - code == set(), f"{name} imports {sorted(closure - code)}: add them to its deps in dvc.yaml"
    assert code - closure == set(), f"{name} lists {sorted(code - closure)}, which it does not import"


OPEN = re.compile(
    r'^\d+\s+open(?:at)?\((?:AT_FDCWD, )?"(?P<path>[^"]+)", (?P<flags>[A-Z_|]+)[^)]*\)\s+=\s+(?P<fd>-?\d+)'
)


def files_read(trace: Path, repo: Path) -> set[str]:
    """Project paths a traced process opened for reading (files and folders), relative to the project; a module's
    compiled bytecode counts as its source."""
    read = set()
    for line in trace.read_text().splitlines():
        match = OPEN.match(line)
        if not match or int(match["fd"]) < 0 or "O_WRONLY" in match["flags"]:
            continue
        path = (repo / match["path"]).resolve()
        if not path.is_relative_to(repo):
            continue
        name = str(path.relative_to(repo))
        if "__pycache__/" in name:  # duel/__pycache__/io.cpython-311.pyc -> duel/io.py
            folder, compiled = name.split("/__pycache__/")
            name = f"{folder}/{compiled.split('.')[0]}.py"
        read.add(name)
    return read


def covered(path: str, allowed: list[str]) -> bool:
    return any(path == a.rstrip("/") or path.startswith(a.rstrip("/") + "/") for a in allowed)


@pytest.mark.slow
def test_every_file_a_stage_reads_is_declared(token_run: StageRun) -> None:
    """Each stage of dvc.yaml, in order, on the small run of Llama-2 (DeepSeek's stages are the same on other files),
    under strace (conftest's token_run): every project file or folder it opened for reading is one of its deps or
    outs (or RUNTIME); so is every folder it lists."""
    if token_run.traces is None:
        pytest.fail("strace is needed (apt-get install strace; make test installs it)")
    repo = token_run.repo.resolve()
    traced = {" ".join(["python", "-m", f"stages.{stage[0]}", *stage[1:]]): stage_name(stage) for stage in PIPELINE}
    undeclared = {}
    for name, stage in stages(repo).items():
        if name.endswith("_deepseek"):  # Llama-2's stages with the other key (test_each_model_has_the_same_stages)
            continue
        assert traced.get(stage["cmd"]) == name, f"{name}: {stage['cmd']} is not among the traced stages"
        allowed = [*declared(stage, "deps"), *declared(stage, "outs"), *declared(stage, "metrics"), *RUNTIME]
        # Outputs are written to a temporary sibling first (.<name>.<random>.tmp), then renamed.
        written = declared(stage, "outs") + declared(stage, "metrics")
        allowed += [str(Path(out).parent / f".{Path(out).name}.") for out in written]
        opened = files_read(token_run.traces / f"{name}.strace", repo) - {ROOT_FOLDER}
        missing = sorted(p for p in opened if not covered(p, allowed) and not temporary(p, allowed))
        if missing:
            undeclared[name] = missing
    assert undeclared == {}, f"read but not declared in dvc.yaml: {undeclared}"


def test_each_model_has_the_same_stages() -> None:
    """A model's stages are the other's with its key: the same commands, deps, outs and params on their own files, so
    tracing Llama-2's stages checks DeepSeek's."""
    graph = stages()
    for name in [n for n in graph if n.endswith("_llama")]:
        twin = yaml.safe_dump(graph[name.replace("_llama", "_deepseek")], sort_keys=True)
        assert twin == yaml.safe_dump(graph[name], sort_keys=True).replace("llama", "deepseek"), name


def temporary(path: str, allowed: list[str]) -> bool:
    """A temporary sibling of an output, or a folder above an output (made or listed while writing it)."""
    return any(path.startswith(a) for a in allowed if a.endswith(".")) or any(a.startswith(path + "/") for a in allowed)


def test_dag_chains_the_card_stages() -> None:
    """The card's six stages stay, in its order along the graph's edges."""
    graph = stages()
    outs = {out: name for name, stage in graph.items() for out in declared(stage, "outs") + declared(stage, "metrics")}
    upstream = {name: {outs[d] for d in declared(stage, "deps") if d in outs} for name, stage in graph.items()}
    chain = ["download", "tokenize", "finetune_llama", "evaluate", "report"]
    for before, after in itertools.pairwise(chain):
        assert before in ancestors(after, upstream), f"{before} is not upstream of {after}"
    assert "finetune_deepseek" in ancestors("evaluate", upstream)
    assert {"base_llama", "base_deepseek"} <= ancestors("tokenize", upstream)
    assert "finetune_llama" not in ancestors("zero_shot_llama", upstream)  # a LoRA change never re-scores a base


def ancestors(name: str, upstream: dict[str, set[str]]) -> set[str]:
    found, todo = set(), [name]
    while todo:
        for parent in upstream[todo.pop()]:
            if parent not in found:
                found.add(parent)
                todo.append(parent)
    return found


# The execution keys only scoring reads; a fine-tune reads every other one (duel.params.ExecutionParams).
SCORING_ONLY = {"eval_batch_size", "eval_padding", "merge_adapter"}


@pytest.mark.parametrize("name", [name for name in stages() if name.startswith("finetune_")])
def test_finetune_declares_every_execution_key_it_reads(name: str) -> None:
    """A new key of how a fine-tune is executed changes its outputs' speed and memory: forgotten under params:,
    dvc status would call an experiment that sets it unchanged."""
    import dataclasses

    from duel.params import ExecutionParams

    declared_keys = {p.split(".", 1)[1] for p in stages()[name]["params"] if p.startswith("execution.")}
    wanted = {field.name for field in dataclasses.fields(ExecutionParams)} - SCORING_ONLY
    assert wanted - declared_keys == set(), f"{name}: add {sorted(wanted - declared_keys)} to its params in dvc.yaml"
