"""Where does a training step's time go? torch.profiler over a few optimizer steps of the finetune stage's own
Trainer run, through a callback, so that what is profiled is the step that trains (model, LoRA, collator, loss,
optimizer, checkpointing and kernels exactly as the params set them). The same for scoring's batches.

    DUEL_PROFILE=out/profile DUEL_PROFILE_STEPS=2:3 python -m stages.finetune llama
    DUEL_PROFILE=out/profile DUEL_PROFILE_STEPS=2:3 python -m stages.zero_shot llama

profiles steps 3 to 5 (scoring: batches 3 to 5, of the longest reviews, which go first; the first two run
unprofiled: warm-up) and writes to out/profile/: kernels.txt (the operators and kernels that took the most device
time, CUDA or CPU), steps.json (seconds per profiled step; scoring: batches.json), idle.json (on a GPU: how much of
the window the GPU computed, and what the host was doing while it did not) and trace.json.gz (a Chrome trace, for
chrome://tracing or Perfetto). Without DUEL_PROFILE nothing is profiled. It changes nothing that is learned or
predicted; it slows the profiled steps, so it is for runs that measure nothing else.
"""

from __future__ import annotations

import bisect
import gzip
import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from duel.errors import ParamsError

ROWS = 40


PLURAL = {"step": "steps", "batch": "batches"}


class ProfileSteps(TrainerCallback):
    """torch.profiler around units skip + 1 .. skip + count of a loop: the Trainer's optimizer steps (as its
    callback), or scoring's batches (duel.evaluation.label_logits calls begin and end)."""

    def __init__(self, folder: Path, skip: int, count: int, unit: str = "step") -> None:
        self.folder, self.skip, self.count, self.unit = folder, skip, count, unit
        self.profiler: profile | None = None
        self.started = 0.0

    def begin(self, done: int) -> None:
        """Before the next unit, `done` of them finished: the window opens after the first `skip`."""
        if done == self.skip and self.profiler is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()
            self.started = time.perf_counter()

    def end(self, done: int) -> None:
        """After a unit, `done` of them finished: the window closes after `count` more, and is written."""
        if self.profiler is not None and done == self.skip + self.count:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds = time.perf_counter() - self.started
            self.profiler.__exit__(None, None, None)
            self.write(self.profiler, seconds)
            self.profiler = None

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.begin(state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.end(state.global_step)

    def write(self, profiler: profile, seconds: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        table = profiler.key_averages().table(sort_by=f"self_{device}_time_total", row_limit=ROWS)
        (self.folder / "kernels.txt").write_text(table)
        unit, units = self.unit, PLURAL[self.unit]
        window = {
            f"first_{unit}": self.skip + 1,
            units: self.count,
            f"seconds_per_{unit}": round(seconds / self.count, 4),
        }
        (self.folder / f"{units}.json").write_text(json.dumps(window, indent=2) + "\n")
        trace = self.folder / "trace.json.gz"
        profiler.export_chrome_trace(str(trace))  # gzipped, as the name ends in .gz
        if torch.cuda.is_available():
            with gzip.open(trace, "rt") as file:
                idle = idle_summary(json.load(file)["traceEvents"])
            (self.folder / "idle.json").write_text(json.dumps(idle, indent=2) + "\n")
        first, last = self.skip + 1, self.skip + self.count
        print(f"profile: {units} {first}-{last} in {self.folder}/ (kernels.txt, trace.json.gz)")


DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_WORK = ("cpu_op", "cuda_runtime", "cuda_driver", "user_annotation")


def idle_summary(events: list[dict[str, Any]], gap_us: float = 10.0) -> dict[str, Any]:
    """From a Chrome trace's events (microseconds): the share of the window from the first kernel's start to the last
    one's end in which the GPU ran something, its idle gaps of gap_us or more, and, per host event name, how long it
    ran inside those gaps (nested operators each count: a name is "running while the GPU waited"), the top ROWS per
    category (cpu_op: PyTorch operators, cuda_runtime: launches and synchronisations, user_annotation: the
    Trainer's and optimizer's own ranges)."""
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("cat") in DEVICE_WORK)
    if not spans:
        return {"kernels": 0}
    gaps: list[tuple[float, float]] = []
    busy = 0.0
    start, end = spans[0]
    for span_start, span_end in spans[1:]:
        if span_start > end:
            busy += end - start
            if span_start - end >= gap_us:
                gaps.append((end, span_start))
            start, end = span_start, span_end
        else:
            end = max(end, span_end)
    busy += end - start
    window = end - spans[0][0]
    starts = [gap[0] for gap in gaps]
    inside: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for event in events:
        if event.get("cat") not in HOST_WORK:
            continue
        begin, finish = event["ts"], event["ts"] + event.get("dur", 0)
        i = max(bisect.bisect_right(starts, begin) - 1, 0)
        while i < len(gaps) and gaps[i][0] < finish:
            overlap = min(finish, gaps[i][1]) - max(begin, gaps[i][0])
            if overlap > 0:
                inside[event["cat"]][event["name"]] += overlap
            i += 1
    durations = sorted(e.get("dur", 0) for e in events if e.get("cat") == "kernel")
    return {
        "window_ms": round(window / 1e3, 3),
        "device_busy_share": round(busy / window, 4) if window else None,
        "idle_ms": round(sum(b - a for a, b in gaps) / 1e3, 3),
        "gaps": len(gaps),
        "kernels": len(durations),
        "kernel_us_median": durations[len(durations) // 2] if durations else None,
        "host_during_idle_ms": {
            category: [[name, round(us / 1e3, 3)] for name, us in sorted(names.items(), key=lambda kv: -kv[1])[:ROWS]]
            for category, names in inside.items()
        },
    }


def from_environment(unit: str = "step") -> ProfileSteps | None:
    """The profiler DUEL_PROFILE (a folder) and DUEL_PROFILE_STEPS ("<skip>:<count>", default 2:3) ask for, over
    optimizer steps (unit "step") or scoring batches ("batch")."""
    folder = os.environ.get("DUEL_PROFILE")
    if not folder:
        return None
    spec = os.environ.get("DUEL_PROFILE_STEPS", "2:3")
    try:
        skip, count = (int(part) for part in spec.split(":"))
    except ValueError:
        raise ParamsError(f"DUEL_PROFILE_STEPS: {spec!r} is not <skip>:<count>, e.g. 2:3") from None
    if skip < 0 or count < 1:
        raise ParamsError(f"DUEL_PROFILE_STEPS: {spec!r} needs skip >= 0 and count >= 1, e.g. 2:3")
    return ProfileSteps(Path(folder), skip, count, unit)
