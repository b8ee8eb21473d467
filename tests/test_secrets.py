"""A hub token in the environment (HF_TOKEN) never reaches what the stages write or print: params, metrics, plots,
reports, adapters' training.json, predictions, logs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from project_copy import StageRun

from duel.hub import versions

pytestmark = pytest.mark.slow

TOKEN_KEY = re.compile(r"(^|_)token$|secret|passw|api_?key|credential|auth", re.IGNORECASE)
TOKEN_VALUE = re.compile(r"hf_[A-Za-z0-9]{30,}")
TEXT_SUFFIXES = {".json", ".yaml", ".md", ".tsv", ".csv", ".txt", ".log"}


def files_holding(root: Path, needle: bytes) -> list[str]:
    return [str(p.relative_to(root)) for p in sorted(root.rglob("*")) if p.is_file() and needle in p.read_bytes()]


def keys(data: Any, prefix: str = "") -> list[str]:
    """Every dotted key of nested mappings and lists."""
    if isinstance(data, dict):
        return [k for key, value in data.items() for k in [f"{prefix}{key}", *keys(value, f"{prefix}{key}.")]]
    if isinstance(data, list):
        return [k for value in data for k in keys(value, prefix)]
    return []


def test_token_in_no_output_and_no_log(token_run: StageRun, hub_token: str) -> None:
    repo = token_run.repo
    written = {str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()}
    for expected in (
        "params.yaml",
        "metrics/data.json",
        "metrics/finetune_llama.json",
        "metrics/evaluate.json",
        "models/adapters/llama/training.json",
        "models/base/llama/model.json",
        "plots/llama/params.yaml",
        "data/predictions/llama_finetuned/predictions.csv",
        "data/predictions/llama_zero_shot/scoring.json",
        "reports/report.md",
    ):
        assert expected in written, f"{expected} was not written: the scan would miss it"
    assert "params.yaml" in files_holding(repo, b"learning_rate")  # the scan reads what the stages wrote
    assert files_holding(repo, hub_token.encode()) == []
    assert hub_token not in token_run.log
    for name in sorted(written):
        if Path(name).suffix in TEXT_SUFFIXES and not name.endswith("tokenizer.json"):
            assert not TOKEN_VALUE.search((repo / name).read_text(errors="replace")), f"{name} holds a hub token"


def test_no_token_keys_in_training_json(token_run: StageRun) -> None:
    training = json.loads((token_run.repo / "models/adapters/llama/training.json").read_text())
    assert {"params", "versions", "metrics"} <= set(training)
    assert [k for k in keys(training) if TOKEN_KEY.search(k.rsplit(".", 1)[-1])] == []
    assert not TOKEN_VALUE.search(json.dumps(training))


def test_no_token_in_versions(monkeypatch: pytest.MonkeyPatch, hub_token: str) -> None:
    monkeypatch.setenv("HF_TOKEN", hub_token)
    found = versions()
    assert "torch" in found and "transformers" in found
    assert [k for k in found if TOKEN_KEY.search(k)] == []
    assert hub_token not in json.dumps(found)


def test_remote_code_runs_only_when_a_param_asks(monkeypatch: pytest.MonkeyPatch, params, tmp_path: Path) -> None:
    """trust_remote_code reaches every loader as the model's param says, and the committed params say false."""
    import dataclasses

    from duel import hub, modeling
    from duel.io import write_json

    class Stop(Exception):
        pass

    seen: list[bool] = []

    def from_pretrained(path: str, **kwargs: object) -> None:
        seen.append(kwargs["trust_remote_code"])
        raise Stop

    monkeypatch.setattr(modeling.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    write_json(tmp_path / "model.json", {"path": str(tmp_path)})
    assert {params.model(key).trust_remote_code for key in params.models} == {False}
    for flag in (False, True):
        model = dataclasses.replace(params.model("llama"), trust_remote_code=flag)
        with pytest.raises(Stop):
            modeling.load_base_model(tmp_path, model, params, "sdpa")
        hub._hub_call("llama", model, lambda checkpoint, revision, trust_remote_code: seen.append(trust_remote_code))
    assert seen == [False, False, True, True]
