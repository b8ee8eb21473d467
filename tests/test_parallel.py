"""How many processes a fine-tune runs as, and the GPUs each stage process claims for a sweep: exclusive file locks,
tried with fake device counts on a CPU (two processes at once get different devices, a third waits)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

from duel import parallel
from duel.errors import ParamsError
from duel.params import Params


def execution(params: Params, **fields: object):
    return dataclasses.replace(params.execution, **fields)


@pytest.mark.parametrize(
    ("micro_batch", "data_parallel", "gpus", "processes"),
    [
        (16, "auto", 0, 1),  # a CPU
        (16, "auto", 8, 1),  # micro-batch 16 of 16 reviews: one process takes the whole step
        (8, "auto", 8, 2),
        (2, "auto", 4, 4),
        (4, "auto", 3, 2),  # 3 does not split 16 reviews in micro-batches of 4; 2 does
        (8, 2, 0, 2),  # two CPU processes (gloo)
        (8, 2, 4, 2),
    ],
)
def test_processes(params: Params, micro_batch: int, data_parallel: object, gpus: int, processes: int) -> None:
    resolved = execution(params, micro_batch=micro_batch, data_parallel=data_parallel)
    assert parallel.data_parallel_processes(resolved, 16, gpus) == processes


def test_more_processes_than_gpus_is_refused(params: Params) -> None:
    with pytest.raises(ParamsError, match=r"execution\.data_parallel: 4 processes, but only 2 GPUs"):
        parallel.data_parallel_processes(execution(params, micro_batch=4, data_parallel=4), 16, 2)


def test_torchrun_world_that_does_not_split_a_step_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ParamsError, match=r"execution\.micro_batch: 8 .*torchrun's world size.*micro_batch: 4"):
        parallel.init_distributed(8, 16)


@pytest.mark.parametrize(("processes", "launcher"), [(1, []), (2, ["-m", "torch.distributed.run"])])
def test_relaunch_runs_the_same_command_anew(monkeypatch: pytest.MonkeyPatch, processes: int, launcher: list) -> None:
    """One process: a plain child (it sees the GPUs claimed for it); more: torchrun's ranks on this machine."""
    commands = []
    monkeypatch.setattr(sys, "argv", ["stages/finetune.py", "llama"])
    monkeypatch.setattr(
        subprocess, "run", lambda command: commands.append(command) or subprocess.CompletedProcess(command, 3)
    )
    assert parallel.relaunch("stages.finetune", processes) == 3
    (command,) = commands
    assert command[: 1 + len(launcher)] == [sys.executable, *launcher]
    assert command[-3:] == ["-m", "stages.finetune", "llama"]
    assert (f"--nproc-per-node={processes}" in command) == (processes > 1)


CLAIM = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from duel.parallel import claim_devices
    count, total, timeout = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    try:
        print(claim_devices(count, total, Path(sys.argv[1]), timeout_s=timeout), flush=True)
    except TimeoutError as err:
        print(f"error: {err}", flush=True)
        sys.exit(1)
    sys.stdin.read()  # hold the devices until the test closes stdin
    """
)


def claimer(folder: Path, count: int, total: int, timeout_s: float = 30) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CLAIM, str(folder), str(count), str(total), str(timeout_s)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_processes_at_once_claim_different_gpus_and_a_third_waits(tmp_path: Path) -> None:
    first, second = claimer(tmp_path, 1, 2), claimer(tmp_path, 1, 2)
    claimed = [first.stdout.readline().strip(), second.stdout.readline().strip()]
    assert sorted(claimed) == ["[0]", "[1]"]
    third = claimer(tmp_path, 1, 2, timeout_s=1)
    output, _ = third.communicate(timeout=30)
    assert third.returncode == 1 and "1 of 2 GPUs not free after 1" in output
    waiting = claimer(tmp_path, 1, 2)  # waits until a GPU is released: when its holder exits
    first.communicate(timeout=30)
    assert waiting.stdout.readline().strip() == claimed[0]
    for process in (second, waiting):
        process.communicate(timeout=30)


def test_a_data_parallel_run_claims_as_many_gpus(tmp_path: Path) -> None:
    one = claimer(tmp_path, 1, 3)
    assert one.stdout.readline().strip() == "[0]"
    two = claimer(tmp_path, 2, 3)
    assert two.stdout.readline().strip() == "[1, 2]"
    for process in (one, two):
        process.communicate(timeout=30)


def test_claim_sets_cuda_visible_devices_unless_the_user_did(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(parallel, "LOCKS", tmp_path)
    monkeypatch.setattr(parallel, "_claimed", [])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(parallel, "host_gpus", lambda: 1)  # one GPU: shared, nothing claimed
    assert not parallel.claim_gpus(1, "zero_shot llama")
    assert "CUDA_VISIBLE_DEVICES" not in os.environ and not list(tmp_path.iterdir())
    monkeypatch.setattr(parallel, "host_gpus", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert not parallel.claim_gpus(1, "finetune llama")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3" and not list(tmp_path.iterdir())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    assert parallel.claim_gpus(2, "finetune llama")  # the stage then runs its work in a child (relaunch)
    assert (os.environ["CUDA_VISIBLE_DEVICES"], os.environ["CUDA_DEVICE_ORDER"]) == ("0,1", "PCI_BUS_ID")
    assert "finetune llama: on GPU 0,1 of 4" in capsys.readouterr().out
    for lock in parallel._claimed:
        lock.close()
