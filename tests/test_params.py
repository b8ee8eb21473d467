"""params.yaml loads into a typed tree; every bad value raises ParamsError naming its dotted key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO

from duel.params import ParamsError, SeedParams, parse_params
from duel.profile import extra_overrides, overlay, set_param_args


def changed(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of raw with one dotted key set (added if absent)."""
    out = copy.deepcopy(raw)
    *parents, leaf = dotted.split(".")
    node = out
    for part in parents:
        node = node[part]
    node[leaf] = value
    return out


def test_valid_params_load(params):
    assert params.seeds == SeedParams(data=42, train=42, weights=42)
    assert params.data.max_length == 512
    assert params.data.label_words == [" negative", " positive"]
    assert set(params.models) == {"llama", "deepseek"}
    assert params.model("llama").checkpoint == "meta-llama/Llama-2-7b-hf"
    assert params.lora.r == 16
    assert params.train.learning_rate == pytest.approx(2e-5)
    assert params.execution.memory_budget_gib is None


def test_grad_accum_is_batch_over_micro_batch(raw_params):
    assert parse_params(raw_params).grad_accum == 16 // 16
    for micro, accum in ((1, 16), (2, 8), (4, 4), (8, 2)):
        assert parse_params(changed(raw_params, "execution.micro_batch", micro)).grad_accum == accum


def test_int_accepted_where_float_expected(raw_params):
    params = parse_params(changed(raw_params, "train.learning_rate", 1))
    assert params.train.learning_rate == 1.0 and isinstance(params.train.learning_rate, float)


@pytest.mark.parametrize(
    ("dotted", "value", "named"),
    [
        ("trian", {"steps": 1}, "trian"),  # unknown top-level key
        ("train.lerning_rate", 2e-5, "train.lerning_rate"),  # misspelled nested key
        ("models.llama.lora_target", ["q_proj"], "models.llama.lora_target"),
        ("train.steps", "ten", "train.steps"),
        ("lora.r", 1.5, "lora.r"),
        ("train.steps", True, "train.steps"),  # a bool is not an int
        ("execution.eval_batch_size", False, "execution.eval_batch_size"),
        ("quantization.enabled", "yes", "quantization.enabled"),
        ("data.label_words", " positive", "data.label_words"),
        ("lora.r", 0, "lora.r"),
        ("lora.r", -4, "lora.r"),
        ("train.learning_rate", 0.0, "train.learning_rate"),
        ("train.learning_rate", -1e-5, "train.learning_rate"),
        ("execution.micro_batch", 0, "execution.micro_batch"),
        ("execution.micro_batch", 3, "execution.micro_batch"),  # does not divide batch_size 16
        ("execution.data_parallel", 0, "execution.data_parallel"),
        ("execution.data_parallel", "all", "execution.data_parallel"),
        ("execution.data_parallel", 2, "execution.data_parallel"),  # micro_batch 16 x 2 does not divide 16
        ("execution.memory_budget_gib", -4, "execution.memory_budget_gib"),
        ("execution.eval_batch_size", 0, "execution.eval_batch_size"),
        ("train.warmup_steps", -1, "train.warmup_steps"),
        ("execution.save_steps", -1, "execution.save_steps"),
        ("seeds.data", -1, "seeds.data"),
        ("seeds.train", 2**32, "seeds.train"),  # beyond what numpy and torch seed from
        ("seeds.weights", 1.5, "seeds.weights"),
        ("quantization.quant_type", "int8", "quantization.quant_type"),
        ("execution.precision", "fp8", "execution.precision"),
        ("models.deepseek.overrides", {"num_hidden_layers": 2}, "models.deepseek.overrides"),  # init: pretrained
        ("execution.precision", "fp16", "execution.precision"),  # with compute_dtype bfloat16
        ("data.prompt", "Review:\nSentiment:", "data.prompt"),
        ("execution.graph_tokens", 0, "execution.graph_tokens"),
    ],
)
def test_bad_value_names_key(raw_params, dotted, value, named):
    with pytest.raises(ParamsError) as err:
        parse_params(changed(raw_params, dotted, value))
    assert named in str(err.value)


def test_missing_key_named(raw_params):
    del raw_params["train"]["warmup_steps"]
    with pytest.raises(ParamsError, match=r"train\.warmup_steps"):
        parse_params(raw_params)


def test_fp16_with_float16_compute_is_fine(raw_params):
    raw = changed(changed(raw_params, "execution.precision", "fp16"), "execution.compute_dtype", "float16")
    params = parse_params(raw)
    assert (params.execution.precision, params.execution.compute_dtype) == ("fp16", "float16")


@pytest.mark.parametrize(
    ("dotted", "value"),
    [("execution.pack_tokens", 256), ("execution.cuda_graphs", True)],  # shorter than data.max_length 512; one row
)
def test_packed_rows_refuse_short_rows_and_cuda_graphs(raw_params, dotted, value):
    packed = changed(raw_params, "execution.padding", "packed")
    assert parse_params(packed).execution.padding == "packed"
    with pytest.raises(ParamsError, match=dotted.replace(".", r"\.")):
        parse_params(changed(packed, dotted, value))


def test_cuda_graphs_need_flattened_rows_and_a_padding_within_a_sequence(raw_params):
    flattened = changed(changed(raw_params, "execution.cuda_graphs", True), "execution.padding", "flattened")
    assert parse_params(flattened).execution.cuda_graphs
    with pytest.raises(ParamsError, match=r"execution\.cuda_graphs"):
        parse_params(changed(flattened, "execution.compile", True))
    with pytest.raises(ParamsError, match=r"execution\.graph_tokens: 1024 is longer than data\.max_length 512"):
        parse_params(changed(flattened, "execution.graph_tokens", 1024))


def test_overrides_allowed_with_random_init(raw_params):
    raw = changed(changed(raw_params, "models.llama.init", "random"), "models.llama.overrides", {"hidden_size": 64})
    assert parse_params(raw).model("llama").overrides == {"hidden_size": 64}


def test_params_are_frozen(params):
    with pytest.raises(AttributeError):
        params.train.steps = 1


def test_unknown_model_key(params):
    with pytest.raises(ParamsError, match=r"models\.mistral"):
        params.model("mistral")


# --- profiles ------------------------------------------------------------------------------------------------------


def s_args(args: list[str]) -> dict[str, str]:
    """{dotted name: value text} from ["-S", "name=value", ...], checking the flags alternate. A Hydra "+"/"++"
    prefix (add or force-add a key) is dropped from the name."""
    assert len(args) % 2 == 0 and args[::2] == ["-S"] * (len(args) // 2)
    pairs = [a.split("=", 1) for a in args[1::2]]
    return {name.lstrip("+"): value for name, value in pairs}


def test_demo_profile_args(raw_params):
    args = s_args(set_param_args(REPO / "profiles" / "demo.yaml", raw_params))
    profile = yaml.safe_load((REPO / "profiles" / "demo.yaml").read_text())
    assert "models.llama.overrides" in args and "models.deepseek.overrides" in args
    assert yaml.safe_load(args["models.llama.init"]) == "random"
    assert yaml.safe_load(args["data.train_size"]) == profile["data"]["train_size"] == 320
    assert yaml.safe_load(args["train.learning_rate"]) == pytest.approx(1e-3)
    # Made absolute, so that the experiment also runs from another folder (a queued run's copy).
    assert yaml.safe_load(args["data.source"]) == str((Path.cwd() / "../shared/data/imdb").resolve())
    # Only what the profile sets, nothing else of params.yaml.
    assert "train.batch_size" not in args and not any(a.startswith("seeds") for a in args)


def test_paper_profile_changes_execution_only(raw_params):
    args = s_args(set_param_args(REPO / "profiles" / "paper.yaml", raw_params))
    assert {k: yaml.safe_load(v) for k, v in args.items()} == {
        "execution.micro_batch": 1,
        "execution.data_parallel": 1,
        "execution.precision": "fp16",
        "execution.padding": "max_length",
        "execution.gradient_checkpointing": True,
        "execution.offload_checkpoints": False,
        "execution.offload_embeddings": False,
        "execution.dequantize_base": False,
        "execution.kernels": "none",
        "execution.logging_steps": 10,
        "execution.compute_dtype": "float16",
        "execution.upcast_fp32": True,
    }


def test_extra_overrides_win_over_the_profile(raw_params):
    extra = extra_overrides(["-S", "data.source=/elsewhere/imdb", "-S", "lora.r=8"])
    args = s_args(set_param_args(REPO / "profiles" / "demo.yaml", raw_params, extra))
    assert yaml.safe_load(args["data.source"]) == "/elsewhere/imdb"
    assert yaml.safe_load(args["lora.r"]) == 8
    with pytest.raises(ParamsError, match=r"lora\.rank"):
        set_param_args(REPO / "profiles" / "demo.yaml", raw_params, extra_overrides(["-S", "lora.rank=8"]))


def test_profile_unknown_key_named(tmp_path: Path, raw_params):
    profile = tmp_path / "bad.yaml"
    profile.write_text("train:\n  stpes: 10\n")
    with pytest.raises(ParamsError, match=r"train\.stpes"):
        set_param_args(profile, raw_params)


def test_profile_bad_value_fails_before_dvc(tmp_path: Path, raw_params):
    profile = tmp_path / "bad.yaml"
    profile.write_text("execution:\n  micro_batch: 5\n")
    with pytest.raises(ParamsError, match=r"execution\.micro_batch"):
        set_param_args(profile, raw_params)


def test_demo_profile_applied_parses(raw_params):
    overrides = yaml.safe_load((REPO / "profiles" / "demo.yaml").read_text())
    params = parse_params(overlay(raw_params, overrides))
    for key in ("llama", "deepseek"):
        model = params.model(key)
        assert model.init == "random"
        assert model.overrides["num_hidden_layers"] == 2
        assert model.lora_targets == raw_params["models"][key]["lora_targets"]  # untouched keys survive
    assert params.train.steps == 20 and params.train.batch_size == 16
    assert params.data.test_size == 400
    assert raw_params["models"]["llama"]["init"] == "pretrained"  # overlay() does not change its input


def test_fused_projections_cannot_be_compiled(raw_params):
    fused = changed(raw_params, "execution.fuse_projections", True)
    assert parse_params(fused).execution.fuse_projections
    with pytest.raises(ParamsError, match=r"execution\.fuse_projections: cannot be compiled"):
        parse_params(changed(fused, "execution.compile", True))
