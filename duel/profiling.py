"""Where does a training step's time go? torch.profiler over a few optimizer steps of the finetune stage's own
Trainer run, through a callback, so that what is profiled is the step that trains (model, LoRA, collator, loss,
optimizer, checkpointing and kernels exactly as the params set them).

    DUEL_PROFILE=out/profile DUEL_PROFILE_STEPS=2:3 python -m stages.finetune llama

profiles steps 3 to 5 (the first two run unprofiled: warm-up) and writes to out/profile/: kernels.txt (the
operators and kernels that took the most device time, CUDA or CPU), steps.json (seconds per profiled step) and
trace.json (a Chrome trace, for chrome://tracing or Perfetto). Without DUEL_PROFILE nothing is profiled. It changes
nothing that is learned; it slows the profiled steps, so it is for runs that measure nothing else.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from duel.errors import ParamsError

ROWS = 40


class ProfileSteps(TrainerCallback):
    """torch.profiler around optimizer steps skip + 1 .. skip + count of the Trainer's run."""

    def __init__(self, folder: Path, skip: int, count: int) -> None:
        self.folder, self.skip, self.count = folder, skip, count
        self.profiler: profile | None = None
        self.started = 0.0

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if state.global_step == self.skip and self.profiler is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()
            self.started = time.perf_counter()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self.profiler is not None and state.global_step == self.skip + self.count:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds = time.perf_counter() - self.started
            self.profiler.__exit__(None, None, None)
            self.write(self.profiler, seconds)
            self.profiler = None

    def write(self, profiler: profile, seconds: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        table = profiler.key_averages().table(sort_by=f"self_{device}_time_total", row_limit=ROWS)
        (self.folder / "kernels.txt").write_text(table)
        steps = {"first_step": self.skip + 1, "steps": self.count, "seconds_per_step": round(seconds / self.count, 4)}
        (self.folder / "steps.json").write_text(json.dumps(steps, indent=2) + "\n")
        profiler.export_chrome_trace(str(self.folder / "trace.json"))
        print(f"profile: steps {self.skip + 1}-{self.skip + self.count} in {self.folder}/ (kernels.txt, trace.json)")


def from_environment() -> ProfileSteps | None:
    """The callback DUEL_PROFILE (a folder) and DUEL_PROFILE_STEPS ("<skip>:<count>", default 2:3) ask for."""
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
    return ProfileSteps(Path(folder), skip, count)
