"""What the hardware paid: torch's memory peaks, NVML's device-level peak, utilization and energy.

Definitions (all per process, on the process's current CUDA device):
- peak_vram_allocated_gib: torch.cuda.max_memory_allocated, tensors alive at the worst moment.
- peak_vram_reserved_gib: torch.cuda.max_memory_reserved, what torch's caching allocator held (>= allocated).
- nvml_peak_gib: highest device memory in use seen by NVML, sampled every 50 ms in a background thread; it also
  counts the CUDA context and other processes, so it is >= reserved when sampled at the peak.
- gpu_util_mean_pct: mean of NVML's utilization.gpu samples (share of time a kernel was running); a fine-tune's
  per-step series gpu_util_pct has the mean over each log line's steps (steps after a compile or warm-up apart).
- energy_j: difference of NVML's total energy counter (millijoules since driver load) over the measured span.
- mfu: model FLOPs utilization, the training's model FLOPs per second over the GPU's dense bf16/fp16 peak
  (PEAK_TFLOPS). Per real token, the decoder layers' projections cost 2N in the forward pass, 2N in the backward
  pass (input gradients only: the frozen weights get none) and 2N again in each checkpointed layer's recomputation
  (N: their weights, LoRA's and attention's own FLOPs left out); padding is not counted as work. eval_mfu: scoring's,
  2N per real token (the forward pass only).
- startup_s: seconds from the stage process's start to the work itself (the first training step, the first scored
  review): imports, CUDA, loading and quantizing the model, planning. eval_startup_s: for a stage scoring several
  models, the first model's counts from the process's start, each next one's from the end of the one before.
  load_s (eval_load_s), within it: building the model (loading and quantizing the weights, dequantizing, planning
  the memory, LoRA or merging the adapter); the rest is imports, CUDA's start and reading the data.
On a machine without a GPU every one of these is null.
- peak_memory_gib: peak_vram_reserved_gib on a GPU, the process's peak resident memory (RSS) on a CPU: the one
  memory figure every run has.
"""

from __future__ import annotations

import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

GIB = 2**30


def process_started() -> float:
    """When this process started, in seconds since the epoch (time.time()'s clock): the start of a stage's startup_s."""
    return psutil.Process().create_time()


@dataclass
class GpuSampler:
    """Samples NVML in a background thread between start() and stop()."""

    interval_s: float = 0.05
    peak_used_bytes: int = 0
    util_samples: list[int] = field(default_factory=list)
    _handle: object | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _energy_start_mj: int | None = None
    _taken: int = 0  # util_samples already averaged by take_util_mean

    def start(self) -> GpuSampler:
        if not torch.cuda.is_available():
            return self
        self._handle = nvml_handle()
        self._energy_start_mj = self.energy_mj()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        import pynvml

        while not self._stop.is_set():
            memory = pynvml.nvmlDeviceGetMemoryInfo(self._handle)
            self.peak_used_bytes = max(self.peak_used_bytes, int(memory.used))
            self.util_samples.append(int(pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))
            self._stop.wait(self.interval_s)

    def take_util_mean(self) -> float | None:
        """Mean utilization of the samples since the previous call (a log line's steps); None without samples."""
        samples = self.util_samples[self._taken :]
        self._taken += len(samples)
        return round(sum(samples) / len(samples), 1) if samples else None

    def energy_mj(self) -> int | None:
        if self._handle is None:
            return None
        import pynvml

        try:
            return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except pynvml.NVMLError:  # not every GPU has the counter
            return None

    def energy_j(self) -> float | None:
        now = self.energy_mj()
        if now is None or self._energy_start_mj is None:
            return None
        return (now - self._energy_start_mj) / 1000

    def stop(self) -> dict[str, float | None]:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        return self.summary()

    def summary(self) -> dict[str, float | None]:
        on_gpu = self._handle is not None
        return {
            "nvml_peak_gib": round(self.peak_used_bytes / GIB, 3) if on_gpu else None,
            "gpu_util_mean_pct": round(sum(self.util_samples) / len(self.util_samples), 1)
            if self.util_samples
            else None,
            "energy_j": round(e, 1) if (e := self.energy_j()) is not None else None,
        }


def nvml_handle() -> Any:
    """NVML's handle of torch's current CUDA device. NVML numbers GPUs ignoring CUDA_VISIBLE_DEVICES: found by UUID."""
    import pynvml

    pynvml.nvmlInit()
    uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")


def device_used_bytes() -> int:
    """Memory in use on torch's current CUDA device as NVML counts it, nvml_peak_gib's measure (nvidia-smi's): torch's
    reserved memory, the CUDA context, loaded kernels, the driver's reserve and any other process's memory. Where
    NVML does not answer, CUDA's own count (total less free, without the driver's reserve)."""
    import pynvml

    try:
        return int(pynvml.nvmlDeviceGetMemoryInfo(nvml_handle()).used)
    except pynvml.NVMLError:
        free, total = torch.cuda.mem_get_info()
        return total - free


def outside_torch_bytes() -> int:
    """Memory in use on this process's GPU that torch's caching allocator does not hold (NVML's used less torch's
    reserved): the CUDA context, the kernels loaded so far, the driver's reserve, any other process's memory."""
    return max(0, device_used_bytes() - torch.cuda.memory_reserved())


def allocator_summary() -> dict[str, float | int | None]:
    """After a fine-tune: outside_torch_gib, the device memory outside torch's allocator (outside_torch_bytes, what
    execution.memory_budget_gib leaves torch less of), and alloc_retries, how often torch's allocator found no free
    block, released its cached ones and tried again (torch's num_alloc_retries: a slow step near a budget's cap)."""
    if not torch.cuda.is_available():
        return {"outside_torch_gib": None, "alloc_retries": None}
    retries = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    return {"outside_torch_gib": round(outside_torch_bytes() / GIB, 3), "alloc_retries": int(retries)}


def torch_memory() -> dict[str, float | None]:
    if not torch.cuda.is_available():
        return {"peak_vram_allocated_gib": None, "peak_vram_reserved_gib": None}
    return {
        "peak_vram_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
        "peak_vram_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
    }


def peak_memory() -> dict[str, float | None]:
    """peak_memory_gib, the one memory figure on every machine (torch's peak reserved VRAM on a GPU, the process's
    peak RSS on a CPU), with torch's allocated and reserved peaks (null without a GPU)."""
    torch_peaks = torch_memory()
    peak = torch_peaks["peak_vram_reserved_gib"] if torch.cuda.is_available() else round(peak_rss_gib(), 3)
    return {"peak_memory_gib": peak, **torch_peaks}


def memory_now_gib() -> float:
    """Memory for the per-step plot: VRAM reserved by torch on a GPU, the process's peak RSS on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.memory_reserved() / GIB
    return peak_rss_gib()


def peak_rss_gib() -> float:
    """The process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux reports KiB


# Dense (no sparsity) bf16/fp16 tensor-core peaks with fp32 accumulation, TFLOP/s, from NVIDIA's data sheets; the
# longest name found in the CUDA device's name wins (H100 PCIe over H100, L40S over L4). MFU is left out elsewhere.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,  # SXM ("NVIDIA H100 80GB HBM3")
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
}


def peak_tflops(device: str, precision: str) -> float | None:
    """The GPU's dense tensor-core peak in bf16/fp16 (TFLOP/s), or None: a CPU, fp32, or a GPU not in PEAK_TFLOPS."""
    known = [name for name in PEAK_TFLOPS if name in device]
    if precision not in ("bf16", "fp16") or not known:
        return None
    return PEAK_TFLOPS[max(known, key=len)]


def model_utilization(tokens_per_s: float, flops_per_token: float, precision: str) -> dict[str, float | None]:
    """Model TFLOP/s at `tokens_per_s` real tokens, and the MFU against the GPU's peak in `precision` (None where the
    peak is unknown: a CPU, fp32, a GPU not in PEAK_TFLOPS)."""
    tflops = tokens_per_s * flops_per_token / 1e12
    peak = peak_tflops(device_name(), precision)
    return {"model_tflops_per_s": round(tflops, 2), "mfu": round(tflops / peak, 4) if peak else None}


def device_name() -> str:
    """The GPU's name as CUDA reports it (the process's first device), or cpu."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def memory_kind() -> str:
    return "cuda_reserved" if torch.cuda.is_available() else "cpu_peak_rss"


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Stopwatch:
    def __init__(self) -> None:
        synchronize()
        self.start = time.perf_counter()

    def elapsed_s(self) -> float:
        synchronize()
        return time.perf_counter() - self.start
