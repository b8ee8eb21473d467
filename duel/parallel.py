"""More than one process or GPU: data parallelism of one fine-tune, and the GPUs each stage process claims.

Data parallelism is torchrun's (torch.distributed.run) with the Trainer's DistributedDataParallel: one process per
rank, each holding the whole model and training on its share of each optimizer step's reviews, the gradients summed
over the ranks (gloo on CPUs, NCCL on GPUs). A stage started without torchrun re-launches itself under it
(`relaunch`); several machines start it under torchrun themselves, with its rendezvous.

Sweeps: on a host with several GPUs, a GPU stage started without CUDA_VISIBLE_DEVICES claims the first free ones
through an exclusive file lock per GPU in a host-wide folder ($DUEL_GPU_LOCKS, else /tmp/duel-gpu-locks), so that
the workers of `dvc queue start -j K` each train on their own GPU; the lock is the open file, released when the
process ends, however it ends.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from duel.errors import ParamsError
from duel.params import ExecutionParams, check_step_split

LOCKS = Path(os.environ.get("DUEL_GPU_LOCKS", "/tmp/duel-gpu-locks"))
_claimed: list = []  # the open lock files of the GPUs this process holds, kept open until it exits


def under_torchrun() -> bool:
    """True in a rank process started by torchrun (which sets LOCAL_RANK for each)."""
    return "LOCAL_RANK" in os.environ


def world_size() -> int:
    """Ranks training together: torchrun's WORLD_SIZE, 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """Rank 0, the one process that writes outputs (every process without torchrun)."""
    return int(os.environ.get("RANK", 0)) == 0


def host_gpus() -> int:
    """The GPUs of this host by NVML, without initialising CUDA (CUDA_VISIBLE_DEVICES must be set before that);
    0 where there is no NVIDIA driver."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    return int(pynvml.nvmlDeviceGetCount())


def visible_gpus() -> int:
    """The GPUs this process may use: those CUDA_VISIBLE_DEVICES names, else all of the host's."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return host_gpus()
    return len([d for d in listed.split(",") if d.strip() and not d.strip().startswith("-")])


def data_parallel_processes(execution: ExecutionParams, batch_size: int, gpus: int) -> int:
    """execution.data_parallel resolved: an integer as given (more than `gpus` is refused on a GPU machine); auto:
    1 on a CPU, else the most of the `gpus` visible GPUs that split a step evenly (train.batch_size divisible by
    micro_batch x processes: 1 at the default micro-batch 16 of 16 reviews, 2 at micro-batch 8)."""
    wanted = execution.data_parallel
    if wanted == "auto":
        return max(n for n in range(1, max(gpus, 1) + 1) if batch_size % (execution.micro_batch * n) == 0)
    if gpus and wanted > gpus:
        raise ParamsError(
            f"execution.data_parallel: {wanted} processes, but only {gpus} GPUs are visible; set it to {gpus} or auto"
        )
    return wanted


def relaunch(module: str, processes: int) -> int:
    """Run `python -m module <this process's arguments>` anew, as `processes` ranks on this machine under torchrun
    (which stops every rank when one fails) or, for one, as a plain child that sees the CUDA_VISIBLE_DEVICES claimed
    here; return its exit status."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command = torchrun if processes > 1 else [sys.executable]
    return subprocess.run([*command, "-m", module, *sys.argv[1:]]).returncode


def launch(stage: str, key: str, execution: ExecutionParams, batch_size: int) -> None:
    """A fine-tune started without torchrun: claim free GPUs and, when it claimed some or needs several ranks, run
    `python -m stages.<stage>` again in children (torchrun ranks, or one child on the claimed GPU) and exit with
    their status. Nothing under torchrun, nor for one process on the GPU this one already has."""
    if under_torchrun():
        return
    processes = data_parallel_processes(execution, batch_size, visible_gpus())
    claimed = claim_gpus(processes, f"{stage} {key}")
    if processes > 1:
        print(f"{stage} {key}: {processes} data-parallel processes under torchrun", flush=True)
    if claimed or processes > 1:
        sys.exit(relaunch(f"stages.{stage}", processes))


def init_distributed(micro_batch: int, batch_size: int) -> None:
    """In a torchrun rank: check that the world splits a step, pin the rank's GPU and join the process group (NCCL
    on GPUs, gloo on CPUs), which the Trainer's accelerate then uses. Nothing without torchrun."""
    if not under_torchrun():
        return
    check_step_split(batch_size, micro_batch, world_size(), "data_parallel: torchrun's world size")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:  # else accelerate names a CPU rank's device cpu:<rank>, which torch.load cannot map a resumed optimizer to
        os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def end_distributed() -> None:
    """Leave the process group together: every rank waits here until all arrive (rank 0 once it has written the
    outputs), so that none tears the group down under another."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def claim_gpus(count: int, stage: str) -> bool:
    """Claim `count` free GPUs of the host for this process and its children (CUDA_VISIBLE_DEVICES), waiting while
    fewer are free; True when it did. CUDA reads CUDA_VISIBLE_DEVICES once, and importing bitsandbytes already starts
    it, so a stage that claimed runs its work in a child (`relaunch`) while it holds the locks. Nothing when
    CUDA_VISIBLE_DEVICES is already set (the user's choice, or a parent's claim), nor on a host with one GPU or none:
    there every process shares the one GPU, as two fine-tunes at once do on an H200."""
    total = host_gpus()
    if "CUDA_VISIBLE_DEVICES" in os.environ or total < 2:
        return False
    devices = claim_devices(count, total, LOCKS)
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA's numbering = NVML's, which the locks count in
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
    print(f"{stage}: on GPU {os.environ['CUDA_VISIBLE_DEVICES']} of {total} (claimed in {LOCKS})", flush=True)
    return True


def claim_devices(count: int, total: int, folder: Path, timeout_s: float | None = None) -> list[int]:
    """Lock `count` of the devices 0..total-1 (the first free ones) in `folder`, and return them; wait while fewer
    are free, at most `timeout_s` (None: as long as it takes)."""
    if count > total:
        raise ParamsError(f"execution.data_parallel: {count} GPUs asked for, the host has {total}")
    folder.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    waited = False
    while True:
        held = []
        for device in range(total):
            lock = (folder / f"gpu{device}.lock").open("a")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            held.append((device, lock))
            if len(held) == count:
                _claimed.extend(lock for _, lock in held)
                return [device for device, _ in held]
        for _, lock in held:  # too few free: let go, so that two waiting processes never hold half each
            lock.close()
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"{count} of {total} GPUs not free after {timeout_s} s (locks in {folder})")
        if not waited:
            print(f"waiting for {count} free GPUs of {total} (each one's lock is in {folder})", flush=True)
            waited = True
        time.sleep(1.0)
