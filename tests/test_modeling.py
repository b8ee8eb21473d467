"""Model building paths that need no hub and no GPU: the random full-size weights' fallback to the CPU."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from duel import modeling


def test_random_weights_fall_back_to_the_cpu(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    entered: list[str] = []

    class Device:  # records the device context the weights are built in (this CPU build has no CUDA to enter)
        def __init__(self, name: str) -> None:
            self.name = name

        def __enter__(self) -> None:
            entered.append(self.name)

        def __exit__(self, *exc: object) -> None:
            return None

    built_in: list[str] = []

    def from_config(config: Any, dtype: torch.dtype) -> str:
        built_in.append(entered[-1])
        if len(built_in) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return "model"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(modeling.torch, "device", Device)
    monkeypatch.setattr(modeling.AutoModelForCausalLM, "from_config", from_config)
    assert modeling._random_model(config=None, seed=0) == "model"
    assert built_in == ["cuda", "cpu"]
    assert "building them on the CPU" in capsys.readouterr().out


def test_kernels_auto_and_a_missing_liger(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto is liger only on CUDA with liger-kernel installed; asking for liger without it is a one-line error."""
    installed = {"liger_kernel": True}
    monkeypatch.setattr(modeling.importlib.util, "find_spec", lambda name: object() if installed.get(name) else None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert modeling.kernels_implementation("auto") == "liger"
    assert modeling.kernels_implementation("none") == "none"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert modeling.kernels_implementation("auto") == "none"  # the Triton kernels need a GPU
    installed["liger_kernel"] = False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert modeling.kernels_implementation("auto") == "none"
    with pytest.raises(modeling.ParamsError, match=r"^train\.kernels: liger needs the liger-kernel package"):
        modeling.kernels_implementation("liger")
