"""GPU tests of the QLoRA path: 4-bit NF4 loading through bitsandbytes, LoRA training on the 4-bit model, and the
saved adapter scored the way stages/evaluate.py scores it. A seeded random Llama (vocabulary 1,000, 2 layers of
width 512) keeps the whole file to seconds (13 s on an H200).

    pytest -m gpu -ra        (skipped, with the reason, where CUDA or bitsandbytes is absent)
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from duel.attention import varlen_available
from duel.evaluation import label_logits, predictions_frame
from duel.io import write_json
from duel.modeling import add_lora, base_weights, dequantize_layers, load_adapter_for_inference, load_base_model
from duel.params import ModelParams, Params
from duel.training import AnswerCollator, AnswerLoss, ReviewDataset, answer_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: bitsandbytes' 4-bit kernels run on a GPU"),
    pytest.mark.skipif(
        importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (pip install bitsandbytes)"
    ),
]

VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS = 1000, 512, 1024, 2, 8
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAD = 0
ANSWERS = (7, 9)  # token ids of the negative and positive answer words in the tiny vocabulary
ATTENTION = "sdpa"  # fixed, so the result does not depend on whether flash-attn is installed
STEPS, LEARNING_RATE = 30, 1e-3
EVAL_BATCH = 3  # 8 reviews -> 3 length-sorted batches of different widths, so left padding is exercised
# Same weights, same dtypes, same kernels: the logits should be bitwise equal. The tolerance allows one bf16 rounding
# step (2^-7 relative), tighter than torch's default for bf16 (rtol 1.6e-2).
SAME_RTOL, SAME_ATOL = 2**-7, 1e-3
# The trained model keeps LoRA (and, with upcast_fp32, the norms, embeddings and head) in fp32; the evaluate stage
# computes all of it in bf16. That moves a logit by a bf16 step or so (0.0625 at |logit| 8-16; measured on an H200:
# 0.0625 packed, 0.024 paper-stack), while the adapter moves the logits by about 10.
CAST_ATOL = 0.25


@dataclass(frozen=True)
class Recipe:
    padding: str
    row_tokens: int
    upcast_fp32: bool


# packed rows (params.yaml's execution, unquantized weights kept in bf16) and the paper's stack (every review padded to
# a fixed length, PEFT's prepare_model_for_kbit_training upcasting the unquantized weights to fp32), both in bf16.
RECIPES = {"packed": Recipe("packed", 64, False), "paper-stack": Recipe("max_length", 48, True)}


@dataclass(frozen=True)
class Setup:
    params: Params
    model: ModelParams
    recipe: Recipe


@dataclass(frozen=True)
class Trained:
    setup: Setup
    model: Any
    """The PEFT model after training, in the dtypes it was trained in."""
    losses: list[float]
    """Answer loss of the fixed batch at each optimizer step, before that step's update."""
    frozen_changed: list[str]
    """Names of non-LoRA parameters whose values changed during training (should be none)."""
    frame: pd.DataFrame


def reviews_frame() -> pd.DataFrame:
    """8 prompts of random tokens, of different lengths, labelled alternately: the answer is a fixed id per prompt."""
    rng = np.random.default_rng(0)
    lengths = (37, 5, 20, 12, 29, 8, 16, 3)
    prompts = [rng.integers(10, VOCAB, size=n).tolist() for n in lengths]  # never the pad or an answer id
    ids = [f"test-{i}" for i in range(len(prompts))]
    return pd.DataFrame({"review_id": ids, "input_ids": prompts, "label": [i % 2 for i in range(len(prompts))]})


def packed_batch(row_tokens: int = 64) -> tuple[dict[str, Any], torch.Tensor]:
    """reviews_frame's 8 reviews as one packed micro-batch on the GPU: the model's inputs, and the labels apart."""
    batch = AnswerCollator(pad_id=PAD, padding="packed", row_tokens=row_tokens)(
        list(ReviewDataset(reviews_frame(), ANSWERS))
    )
    labels = batch.pop("labels").cuda()
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}, labels


def setup_for(params: Params, recipe: Recipe) -> Setup:
    """The project's params with the QLoRA recipe pinned."""
    pinned = dataclasses.replace(
        params,
        quantization=dataclasses.replace(
            params.quantization,
            enabled=True,
            quant_type="nf4",
            double_quant=True,
        ),
        lora=dataclasses.replace(params.lora, r=16, alpha=32, dropout=0.05),
        execution=dataclasses.replace(
            params.execution,
            gradient_checkpointing=True,
            precision="bf16",
            compute_dtype="bfloat16",
            upcast_fp32=recipe.upcast_fp32,
        ),
    )
    return Setup(pinned, dataclasses.replace(pinned.model("llama"), lora_targets=PROJECTIONS), recipe)


def gpu_bytes_now() -> int:
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/base/<key>/ as the download stage writes it for init: random: seeded bf16 weights and model.json."""
    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=256,
        pad_token_id=PAD,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    write_json(path / "model.json", {"path": str(path)})  # the one field load_base_model reads
    return path


@pytest.fixture(scope="module", params=list(RECIPES), ids=list(RECIPES))
def trained(request: pytest.FixtureRequest, params: Params, base_dir: Path) -> Trained:
    """LoRA on the 4-bit model, trained as the Trainer would (collator batch moved to the GPU, labels popped for the
    loss function, bf16 autocast) on one fixed batch for 30 AdamW steps at lr 1e-3."""
    setup = setup_for(params, RECIPES[request.param])
    torch.manual_seed(0)
    model = add_lora(load_base_model(base_dir, setup.model, setup.params, ATTENTION), setup.model, setup.params)
    frame = reviews_frame()
    dataset = ReviewDataset(frame, ANSWERS)
    collate = AnswerCollator(pad_id=PAD, padding=setup.recipe.padding, row_tokens=setup.recipe.row_tokens)
    batch = collate([dataset[i] for i in range(len(dataset))])
    labels = batch.pop("labels").cuda()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    model.train()
    losses = []
    for _ in range(STEPS):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = answer_loss(model(**inputs), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    changed = [n for n, p in model.named_parameters() if n in frozen and not torch.equal(p.detach(), frozen[n])]
    return Trained(setup, model, losses, changed, frame)


def test_base_model_loads_in_4bit_nf4_on_the_gpu(params: Params, base_dir: Path):
    import bitsandbytes as bnb

    setup = setup_for(params, RECIPES["packed"])
    before = gpu_bytes_now()
    model = load_base_model(base_dir, setup.model, setup.params, ATTENTION)
    quantized_bytes = gpu_bytes_now() - before

    linear4 = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(linear4) == LAYERS * len(PROJECTIONS)
    assert {name.rsplit(".", 1)[1] for name in linear4} == set(PROJECTIONS)
    for name, module in linear4.items():
        weight = module.weight
        assert isinstance(weight, bnb.nn.Params4bit), name
        assert weight.device.type == "cuda" and weight.dtype == torch.uint8, name
        assert weight.numel() == module.in_features * module.out_features // 2, name  # two 4-bit codes per byte
        assert module.compute_dtype == torch.bfloat16, name
        state = weight.quant_state
        assert state.quant_type == "nf4", name
        assert tuple(state.shape) == (module.out_features, module.in_features), name
        assert state.dtype == torch.bfloat16, name  # what dequantization gives back
        # Double quant: the per-block constants are themselves quantized to 8 bits, with their own state.
        assert state.nested and state.state2 is not None and state.absmax.dtype == torch.uint8, name
    # transformers keeps the output layer (and the embeddings, norms) unquantized, in the compute dtype
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.device.type == "cuda"

    # bf16: 2 bytes per weight. 4 bits: half a byte per projection weight + 1 byte of absmax per block of 64, and
    # 2 bytes for the rest: 5.24 M projection weights and 1.03 M others -> 12.5 MB in bf16, about 4.8 MB in 4 bits.
    projection_weights = sum(m.in_features * m.out_features for m in linear4.values())
    other_weights = sum(p.numel() for p in model.parameters() if not isinstance(p, bnb.nn.Params4bit))
    bf16_bytes = 2 * (projection_weights + other_weights)
    expected_bytes = projection_weights // 2 + projection_weights // 64 + 2 * other_weights
    assert quantized_bytes < 0.5 * bf16_bytes, (quantized_bytes, bf16_bytes)
    assert quantized_bytes < 1.1 * expected_bytes, (quantized_bytes, expected_bytes)
    del model


def test_lora_on_4bit_trains_only_lora_and_the_loss_falls(trained: Trained):
    import bitsandbytes as bnb

    named = dict(trained.model.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), [n for n in trainable if "lora_" not in n]
    assert len(trainable) == 2 * LAYERS * len(PROJECTIONS)  # lora_A and lora_B of every adapted projection
    # fp32 LoRA weights: AdamW's steps at the paper's lr 2e-5 would mostly round away in bf16
    assert {named[n].dtype for n in trainable} == {torch.float32}
    unquantized = {p.dtype for n, p in named.items() if "lora_" not in n and not isinstance(p, bnb.nn.Params4bit)}
    assert unquantized == {torch.float32 if trained.setup.recipe.upcast_fp32 else torch.bfloat16}
    assert trained.frozen_changed == []  # the 4-bit weights, embeddings, norms and head did not move

    assert all(np.isfinite(trained.losses)), trained.losses
    # Random weights: about ln(1000) = 6.9 at first; learning the answer id of 8 prompts brings it far down.
    assert trained.losses[0] > 5.0, trained.losses
    assert trained.losses[-1] < 0.5 * trained.losses[0], trained.losses


def test_saved_adapter_reloads_to_the_same_evaluation_logits(trained: Trained, base_dir: Path, tmp_path: Path):
    setup, model, frame = trained.setup, trained.model, trained.frame
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir, safe_serialization=True)  # as the finetune stage saves it
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    as_trained = label_logits(model, frame, ANSWERS, PAD, EVAL_BATCH, "as trained")

    # Loaded as stages/evaluate.py loads it: a fresh 4-bit base, then the adapter cast to the compute dtype.
    reloaded = load_adapter_for_inference(load_base_model(base_dir, setup.model, setup.params, ATTENTION), adapter_dir)
    trained_params, reloaded_params = dict(model.named_parameters()), dict(reloaded.named_parameters())
    assert sorted(reloaded_params) == sorted(trained_params)
    for name, param in reloaded_params.items():
        if "lora_" in name:  # the file round trip loses nothing beyond the cast
            assert torch.equal(param, trained_params[name].to(param.dtype)), name

    logits = label_logits(reloaded, frame, ANSWERS, PAD, EVAL_BATCH, "reloaded")
    with reloaded.disable_adapter():
        zero_shot = label_logits(reloaded, frame, ANSWERS, PAD, EVAL_BATCH, "zero-shot")
    labels = frame["label"].to_numpy()
    predicted = predictions_frame(frame, logits)["predicted"].to_numpy()

    assert (predicted == labels).all()  # the answer learned for each prompt survives the round trip
    # What evaluating in bf16 costs: the logits barely move, the predictions not at all.
    print(f"max |reloaded - as trained| = {np.abs(logits - as_trained).max():.3g}")
    np.testing.assert_allclose(logits, as_trained, rtol=0, atol=CAST_ATOL)
    np.testing.assert_array_equal(predicted, predictions_frame(frame, as_trained)["predicted"].to_numpy())
    # The comparisons can fail: the adapter moves these logits far beyond the tolerances.
    assert np.abs(logits - zero_shot).max() > 4 * CAST_ATOL, np.abs(logits - zero_shot).max()

    # The trained model in the evaluate stage's dtypes (the casts are exact for the frozen weights, which were bf16
    # values; for LoRA they are the helper's own rounding) scores exactly as the reloaded one. Done last: it changes
    # the fixture's model.
    for name, param in trained_params.items():
        if param.dtype != reloaded_params[name].dtype:
            param.data = param.data.to(reloaded_params[name].dtype)
    in_eval_dtypes = label_logits(model, frame, ANSWERS, PAD, EVAL_BATCH, "in eval dtypes")
    print(f"max |reloaded - trained in eval dtypes| = {np.abs(logits - in_eval_dtypes).max():.3g} (0 expected)")
    np.testing.assert_allclose(logits, in_eval_dtypes, rtol=SAME_RTOL, atol=SAME_ATOL)


def loss_and_lora_grads(model: Any, inputs: dict[str, Any], labels: torch.Tensor) -> tuple[float, dict[str, Any]]:
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = answer_loss(model(**inputs), labels)
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def assert_same_loss_and_grads(reference: tuple[float, dict[str, Any]], other: tuple[float, dict[str, Any]]) -> None:
    """Two ways of computing the same step, up to bf16 rounding: the loss within 2%, and each LoRA gradient tensor
    as a whole (relative norm of the difference) within 5%."""
    (reference_loss, reference_grads), (other_loss, other_grads) = reference, other
    assert other_loss == pytest.approx(reference_loss, rel=2e-2), (reference_loss, other_loss)
    assert sorted(other_grads) == sorted(reference_grads) and reference_grads
    for name, grad in reference_grads.items():
        difference = (other_grads[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert difference < 5e-2, (name, float(difference))


@pytest.mark.parametrize("share", ["all", "half"])
def test_dequantized_base_computes_the_4bit_loss_and_gradients(params: Params, base_dir: Path, share: str):
    """execution.dequantize_base: LoRA on the base dequantized once into bf16 (in all its decoder layers, or in the
    first half, as a memory budget has it) against LoRA on the 4-bit base (which dequantizes in every forward and
    backward pass, then takes the plain product): on a packed batch the loss and the LoRA gradients are the same,
    dropout masks included, and the dequantized layers' projections are plain bf16 layers."""

    setup = setup_for(params, RECIPES["packed"])
    inputs, labels = packed_batch()
    results = {}
    for dequantize in (False, True):
        base = load_base_model(base_dir, setup.model, setup.params, ATTENTION)
        layers = len(base.model.layers)
        if dequantize:
            base = dequantize_layers(base, layers if share == "all" else layers // 2)
            assert base.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
        torch.manual_seed(0)  # the same LoRA initialisation (and dropout masks) for both
        model = add_lora(base, setup.model, setup.params)
        expected = {"all": "unquantized", "half": "partly dequantized"}[share] if dequantize else "4-bit"
        assert base_weights(model) == expected
        results[dequantize] = loss_and_lora_grads(model, inputs, labels)
        del model, base
    (loss, grads), (dequantized_loss, dequantized_grads) = results[False], results[True]
    worst = max(
        float((dequantized_grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)) for n, g in grads.items()
    )
    print(f"loss {loss} against {dequantized_loss}; largest gradient difference {worst:.3g} of the tensor's largest")
    assert_same_loss_and_grads(results[False], results[True])


@pytest.mark.parametrize("offload_checkpoints", [False, True])
def test_embeddings_in_host_memory_compute_the_same_loss_and_gradients(
    params: Params, base_dir: Path, offload_checkpoints: bool
):
    """execution.offload_embeddings on the 4-bit base: the collator's inputs_embeds from the table in host memory
    give the loss and LoRA gradients of the embedding on the GPU (with every layer checkpointed, offloaded or not),
    and the GPU holds the table's bytes less."""
    from duel.checkpointing import set_checkpointed_layers
    from duel.embeddings import offload_input_embeddings

    setup = setup_for(params, RECIPES["packed"])
    inputs, labels = packed_batch()
    results, held = {}, {}
    for offload in (False, True):
        base = load_base_model(base_dir, setup.model, setup.params, ATTENTION)
        table = offload_input_embeddings(base) if offload else None
        torch.manual_seed(0)  # the same LoRA initialisation (and dropout masks) for both
        model = add_lora(base, setup.model, setup.params)
        set_checkpointed_layers(model, LAYERS, LAYERS if offload_checkpoints else 0)
        held[offload] = gpu_bytes_now()
        batch = dict(inputs)
        if table is not None:
            batch["inputs_embeds"] = table[batch.pop("input_ids").cpu()].cuda()
        results[offload] = loss_and_lora_grads(model, batch, labels)
        del model, base
    assert held[False] - held[True] == VOCAB * HIDDEN * 2  # the bf16 table
    assert_same_loss_and_grads(results[False], results[True])


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel (requirements-gpu)")
def test_liger_kernels_compute_the_same_loss_and_gradients(
    params: Params, base_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    """execution.kernels: liger swaps RMSNorm, RoPE and SwiGLU for fused Triton kernels; on the 4-bit LoRA model and a
    packed batch the loss and the LoRA gradients stay those of the plain kernels, up to bf16 rounding."""
    from transformers.models.llama import modeling_llama

    # Liger replaces the module's RoPE function, RMSNorm and MLP classes for every Llama built afterwards in the
    # process: undo that after this test (on the H200 the leak put Liger's RMSNorm into the later tests' models).
    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    setup = setup_for(params, RECIPES["packed"])
    inputs, labels = packed_batch()
    results = {}
    for kernels in ("none", "liger"):
        torch.manual_seed(0)  # the same LoRA initialisation (and dropout masks) for both
        base = load_base_model(base_dir, setup.model, setup.params, ATTENTION, kernels)
        model = add_lora(base, setup.model, setup.params)
        results[kernels] = loss_and_lora_grads(model, inputs, labels)
        if kernels == "liger":
            layer = base.model.layers[0]
            assert layer.mlp._get_name() == "LigerSwiGLUMLP" and layer.input_layernorm._get_name() == "LigerRMSNorm"
        del model, base
    assert_same_loss_and_grads(results["none"], results["liger"])


def test_the_training_loss_waits_on_no_host_synchronisation():
    """The training loss (AnswerLoss: answer_loss with the label-word loss beside it) and its backward on a packed
    batch's kept logits queue their kernels without waiting for the GPU: CUDA's sync debug mode makes any
    synchronisation (a nonzero, a unique, an .item()) an error. A step then runs ahead of the GPU to its log line."""
    dataset = ReviewDataset(reviews_frame(), ANSWERS)
    batch = AnswerCollator(pad_id=PAD, padding="packed", row_tokens=40)(list(dataset))
    labels = batch["labels"].cuda()
    kept = len(batch["logits_to_keep"])
    logits = torch.randn(labels.shape[0], kept, 300, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    outputs = type("Outputs", (), {"logits": logits})()
    tracked = AnswerLoss(ANSWERS)
    reviews = torch.tensor(len(dataset), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = tracked(outputs, labels, num_items_in_batch=reviews)
        loss.backward()
        unweighted = answer_loss(outputs, labels)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert labels.shape[0] > 1 and kept > 1  # several rows, each answer at its own column
    assert torch.isfinite(loss) and unweighted.item() == pytest.approx(loss.item(), rel=1e-6)
    assert int(tracked.reviews) == len(dataset)


@pytest.mark.parametrize("dequantize", [False, True], ids=["4bit", "dequantized"])
def test_compiled_layers_compute_the_same_loss_and_gradients(params: Params, base_dir: Path, dequantize: bool):
    """execution.compile: each decoder layer of the 4-bit LoRA model (or of LoRA on that base dequantized,
    execution.dequantize_base) through torch.compile (bitsandbytes' 4-bit matmul and PEFT's LoRA inside the compiled
    code, without a graph break); on two packed batches of different widths the loss and the LoRA gradients stay
    those of eager mode, up to bf16 rounding. No LoRA dropout: compiled code draws its random masks from another
    generator."""
    from torch._dynamo.utils import counters

    from duel.modeling import compile_layers, compile_summary

    setup = setup_for(params, RECIPES["packed"])
    pinned = dataclasses.replace(setup.params, lora=dataclasses.replace(setup.params.lora, dropout=0.0))
    batches = [packed_batch(row_tokens) for row_tokens in (64, 40)]
    assert batches[0][0]["input_ids"].shape[1] != batches[1][0]["input_ids"].shape[1]
    torch._dynamo.reset()
    counters.clear()
    results: dict[bool, list[tuple[float, dict[str, Any]]]] = {}
    try:
        for compiled in (False, True):
            torch.manual_seed(0)  # the same LoRA initialisation for both
            base = load_base_model(base_dir, setup.model, pinned, ATTENTION)
            if dequantize:
                base = dequantize_layers(base, len(base.model.layers))
            model = add_lora(base, setup.model, pinned)
            assert base_weights(model) == ("unquantized" if dequantize else "4-bit")
            assert model.base_model.model.model.layers[0].input_layernorm._get_name() == "LlamaRMSNorm"
            compile_layers(model, compiled)
            results[compiled] = []
            for inputs, labels in batches:
                model.zero_grad(set_to_none=True)
                results[compiled].append(loss_and_lora_grads(model, inputs, labels))
            del model, base
        cache = compile_summary()
    finally:
        torch._dynamo.reset()  # no compiled code or dynamo state left for the tests after this one
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert cache["graphs_compiled"] + cache["graphs_from_cache"] >= 2, cache  # a forward and a backward graph
    for eager, compiled in zip(results[False], results[True], strict=True):
        assert_same_loss_and_grads(eager, compiled)


@pytest.mark.skipif(not varlen_available(), reason="needs PyTorch 2.9 or newer and an Ampere or newer GPU")
@pytest.mark.parametrize("kernel", ["varlen", "flex_attention"])
def test_varlen_attention_computes_the_masked_sdpa_loss_and_gradients(params: Params, base_dir: Path, kernel: str):
    """execution.attention varlen (PyTorch's variable-length Flash Attention on the collator's cu_seq_lens) and
    flex_attention (transformers' FlexAttention on its packed-sequence block mask) against SDPA on transformers'
    packed-sequence mask: on the 4-bit LoRA model and a packed batch, the same loss and LoRA gradients up to bf16
    rounding."""
    setup = setup_for(params, RECIPES["packed"])
    inputs, labels = packed_batch()
    results = {}
    for attention in ("sdpa", kernel):
        torch.manual_seed(0)  # the same LoRA initialisation (and dropout masks) for both
        model = add_lora(load_base_model(base_dir, setup.model, setup.params, attention), setup.model, setup.params)
        assert model.config._attn_implementation == attention
        results[attention] = loss_and_lora_grads(model, inputs, labels)
        del model
    assert_same_loss_and_grads(results["sdpa"], results[kernel])


@pytest.mark.skipif(not varlen_available(), reason="needs PyTorch 2.9 or newer and an Ampere or newer GPU")
@pytest.mark.parametrize("kernel", ["varlen", "sdpa"])
def test_flattened_scoring_gives_the_left_padded_logits(params: Params, base_dir: Path, kernel: str):
    """execution.eval_padding flattened on the 4-bit base: a batch's reviews in one row, varlen taking their
    boundaries (or sdpa its block mask from the position ids), give the logits of left-padded batches under sdpa's
    mask, up to bf16 rounding; the reviews' own logits differ far more than that."""
    setup = setup_for(params, RECIPES["packed"])
    frame = reviews_frame()
    padded_model = load_base_model(base_dir, setup.model, setup.params, "sdpa")
    padded = label_logits(padded_model, frame, ANSWERS, PAD, EVAL_BATCH, "left-padded")
    flat_model = padded_model if kernel == "sdpa" else load_base_model(base_dir, setup.model, setup.params, kernel)
    flattened = label_logits(flat_model, frame, ANSWERS, PAD, EVAL_BATCH, "flattened", flattened=True)
    print(f"max |flattened - left-padded| = {np.abs(flattened - padded).max():.3g}")
    np.testing.assert_allclose(flattened, padded, rtol=SAME_RTOL, atol=SAME_ATOL * 10)
    assert np.abs(padded[:, None] - padded[None]).max() > 100 * SAME_ATOL  # the reviews differ: a mix-up would show


@pytest.mark.skipif(not varlen_available(), reason="needs PyTorch 2.9 or newer and an Ampere or newer GPU")
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-checkpointing", "checkpointed"])
@pytest.mark.parametrize("dequantize", [False, True], ids=["4bit", "dequantized"])
def test_cuda_graphs_train_as_the_eager_trainer(
    params: Params, base_dir: Path, tmp_path: Path, dequantize: bool, checkpointing: bool
):
    """execution.cuda_graphs: the Trainer replaying a captured graph per row length (duel/graphs.py) against the
    plain Trainer on the same flattened rows (padded for the graphs) and varlen attention: 4 steps of 2 micro-batches
    of 4 reviews (gradient accumulation through the graphs' own gradient tensors, the Trainer's zero_grad between
    steps) log the same losses and leave the same LoRA weights, up to bf16 rounding; the run captured fewer graphs than
    it had micro-batches (the others replayed). No LoRA dropout: the graphs draw their masks at other offsets."""
    from transformers import Trainer

    from duel.graphs import GraphedTrainer
    from duel.training import training_arguments

    setup = setup_for(params, RECIPES["packed"])
    pinned = dataclasses.replace(
        setup.params,
        lora=dataclasses.replace(setup.params.lora, dropout=0.0),
        train=dataclasses.replace(setup.params.train, steps=4, batch_size=8, learning_rate=1e-3, warmup_steps=0),
        execution=dataclasses.replace(
            setup.params.execution,
            micro_batch=4,
            padding="flattened",
            cuda_graphs=True,
            graph_tokens=32,
            gradient_checkpointing=checkpointing,
            dequantize_base=dequantize,
            logging_steps=1,
            save_steps=0,
        ),
    )
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(
        {
            "input_ids": [rng.integers(10, VOCAB, size=n).tolist() for n in rng.integers(3, 40, size=32)],
            "label": [i % 2 for i in range(32)],
        }
    )
    dataset = ReviewDataset(frame, ANSWERS)
    collate = AnswerCollator(pad_id=PAD, padding="flattened", row_tokens=64, graph_tokens=32)
    runs = {}
    for graphed in (False, True):
        base = load_base_model(base_dir, setup.model, pinned, "varlen")
        if dequantize:
            base = dequantize_layers(base, len(base.model.layers))
        torch.manual_seed(0)  # the same LoRA initialisation for both
        model = add_lora(base, setup.model, pinned)
        trainer_class = GraphedTrainer if graphed else Trainer
        trainer = trainer_class(
            model=model,
            args=training_arguments(pinned, tmp_path / f"run-{graphed}"),
            train_dataset=dataset,
            data_collator=collate,
            compute_loss_func=AnswerLoss(ANSWERS),
        )
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        lora = {n: p.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}
        runs[graphed] = (losses, lora, len(getattr(trainer, "captured", {})))
        del trainer, model, base
    (eager_losses, eager_lora, _), (graph_losses, graph_lora, captured) = runs[False], runs[True]
    print(f"losses eager {eager_losses}, graphed {graph_losses}; {captured} graphs for 7 micro-batches after the first")
    assert len(eager_losses) == len(graph_losses) == 4 and all(np.isfinite(graph_losses))
    np.testing.assert_allclose(graph_losses, eager_losses, rtol=2e-2)
    assert 1 <= captured < 7
    for name, weight in eager_lora.items():
        difference = (graph_lora[name] - weight).norm() / weight.norm().clamp_min(1e-12)
        assert difference < 2e-2, (name, float(difference))


@pytest.mark.parametrize("dequantize", [False, True], ids=["4bit", "dequantized"])
def test_fused_projections_compute_the_same_loss_and_gradients(params: Params, base_dir: Path, dequantize: bool):
    """execution.fuse_projections: q/k/v and gate/up computed together (duel/fused.py) over the 4-bit base (each
    member's own bitsandbytes product) and over the dequantized one (one product over the fused weight), under bf16
    autocast, against PEFT's own projections: the same loss and LoRA gradients up to bf16 rounding. No LoRA dropout:
    the fused groups draw their masks in another order."""
    from duel.fused import fuse_projections, fused_groups

    setup = setup_for(params, RECIPES["packed"])
    pinned = dataclasses.replace(setup.params, lora=dataclasses.replace(setup.params.lora, dropout=0.0))
    inputs, labels = packed_batch()
    results = {}
    for fused in (False, True):
        base = load_base_model(base_dir, setup.model, pinned, ATTENTION)
        if dequantize:
            base = dequantize_layers(base, len(base.model.layers))
        torch.manual_seed(0)  # the same LoRA initialisation for both
        model = add_lora(base, setup.model, pinned)
        if fused:
            assert fuse_projections(model) == fused_groups(model) == 2 * LAYERS
        results[fused] = loss_and_lora_grads(model, inputs, labels)
        del model, base
    print(f"loss {results[False][0]} plain, {results[True][0]} fused")
    assert_same_loss_and_grads(results[False], results[True])


def test_expandable_segments_reach_the_allocator_after_cuda_is_up():
    """execution.expandable_segments: the stage asks for them after its imports, and bitsandbytes' import has started
    CUDA by then; the segments torch maps afterwards must still be expandable (a fresh process, the stage's order)."""
    script = (
        "import os, torch, bitsandbytes\n"
        "from duel.checkpointing import configure_allocator\n"
        "print(configure_allocator(True))\n"
        "x = torch.empty(256 * 2**20, dtype=torch.uint8, device='cuda')\n"
        "print(all(s['is_expandable'] for s in torch.cuda.memory_snapshot()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["expandable_segments:True", "True"], done.stdout


def test_memory_budget_holds_the_card_within_it():
    """execution.memory_budget_gib is the card's memory as NVML counts it: with the CUDA context up, a budget of what
    the GPU holds plus 1 GiB lets torch allocate 0.75 GiB more and not 1.25 (a cap at the budget itself would: the
    context's memory would not count), and NVML's used memory stays within the budget (a fresh process)."""
    script = (
        "import torch\n"
        "from duel.checkpointing import limit_gpu_memory\n"
        "from duel.telemetry import device_used_bytes, outside_torch_bytes\n"
        "GIB = 2**30\n"
        "torch.ones(1, device='cuda')\n"
        "budget = (outside_torch_bytes() + torch.cuda.memory_reserved()) / GIB + 1.0\n"
        "limit_gpu_memory(budget)\n"
        "kept = torch.empty(int(0.75 * GIB), dtype=torch.uint8, device='cuda')\n"
        "try:\n"
        "    more = torch.empty(int(0.5 * GIB), dtype=torch.uint8, device='cuda')\n"
        "    refused = False\n"
        "except torch.OutOfMemoryError:\n"
        "    refused = True\n"
        "print(budget, device_used_bytes() / GIB, refused)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    budget, used, refused = done.stdout.split()
    print(f"budget {float(budget):.2f} GiB, NVML used {float(used):.2f} GiB, 0.5 GiB more refused: {refused}")
    assert refused == "True" and float(used) <= float(budget)
