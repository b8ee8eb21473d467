"""Model building paths that need no hub and no GPU: the random full-size weights' fallback to the CPU."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from duel import checkpointing, hub, modeling


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
    monkeypatch.setattr(hub.torch, "device", Device)
    from transformers import AutoModelForCausalLM  # what hub._random_model imports when it runs

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", from_config)
    assert hub._random_model(config=None, seed=0) == "model"
    assert built_in == ["cuda", "cpu"]
    assert "base: the random weights do not fit on the GPU; building them on the CPU" in capsys.readouterr().out


def test_kernels_auto_and_a_missing_liger(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto is liger only on CUDA with liger-kernel installed; asking for liger without it is a one-line error."""
    installed = {"liger_kernel": True, "triton": True}
    monkeypatch.setattr(modeling.importlib.util, "find_spec", lambda name: object() if installed.get(name) else None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert modeling.kernels_implementation("auto") == "liger"
    assert modeling.kernels_implementation("none") == "none"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert modeling.kernels_implementation("auto") == "none"  # the Triton kernels need a GPU
    installed["liger_kernel"] = False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert modeling.kernels_implementation("auto") == "none"
    with pytest.raises(
        modeling.ParamsError, match=r"^execution\.kernels: liger needs the liger-kernel and triton packages"
    ):
        modeling.kernels_implementation("liger")
    installed["liger_kernel"] = True
    assert modeling.kernels_implementation("auto", compiled=True) == "none"  # inductor fuses them itself
    with pytest.raises(modeling.ParamsError, match=r"^execution\.kernels: liger cannot be compiled"):
        modeling.kernels_implementation("liger", compiled=True)


def test_attention_auto_and_varlen(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: flash_attention_2 where flash-attn is installed; else varlen for packed rows where PyTorch has it on
    CUDA; else sdpa. Scoring's padded batches get sdpa for varlen; varlen without CUDA is a one-line error."""
    from duel import attention

    flash = {"flash_attn": False}
    real_find_spec = modeling.importlib.util.find_spec
    monkeypatch.setattr(
        modeling.importlib.util, "find_spec", lambda name: object() if flash.get(name) else real_find_spec(name)
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert modeling.attention_implementation("auto", packed=True) == "sdpa"
    with pytest.raises(modeling.ParamsError, match=r"^execution\.attention: varlen needs an Ampere or newer CUDA GPU"):
        modeling.attention_implementation("varlen", packed=True)
    with pytest.raises(modeling.ParamsError, match=r"^execution\.attention: flex_attention trains on a CUDA GPU only"):
        modeling.attention_implementation("flex_attention", packed=True)
    assert modeling.attention_implementation("flex_attention", packed=False) == "sdpa"  # scoring
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4
    assert not attention.varlen_available()
    assert modeling.attention_implementation("auto", packed=True) == "sdpa"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100 / H200
    assert attention.varlen_available()
    monkeypatch.setattr(attention, "varlen_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert modeling.attention_implementation("auto", packed=True) == "varlen"
    assert modeling.attention_implementation("auto", packed=False) == "sdpa"
    assert modeling.attention_implementation("varlen", packed=False) == "sdpa"
    assert modeling.attention_implementation("eager", packed=True) == "eager"
    assert modeling.attention_implementation("flex_attention", packed=True) == "flex_attention"
    assert modeling.attention_implementation("flex_attention", packed=False) == "sdpa"
    flash["flash_attn"] = True
    assert modeling.attention_implementation("auto", packed=True) == "flash_attention_2"
    # CUDA graphs capture varlen only: transformers' Flash Attention 2 path synchronises with the host.
    assert modeling.attention_implementation("auto", packed=True, graphs=True) == "varlen"
    with pytest.raises(modeling.ParamsError, match=r"^execution\.attention: flash_attention_2 cannot be captured"):
        modeling.attention_implementation("flash_attention_2", packed=True, graphs=True)
    with pytest.raises(modeling.ParamsError, match=r"^execution\.attention: flex_attention cannot be captured"):
        modeling.attention_implementation("flex_attention", packed=True, graphs=True)


GIB = 2**30


class FakeGpu:
    """torch.cuda's memory calls on an 80 GiB GPU where torch holds 10 GiB, 60 GiB are free and 1.2 GiB are in use
    outside torch (the CUDA context), and the allocator caps set on it."""

    total, reserved, free, outside = 80 * GIB, 10 * GIB, 60 * GIB, int(1.2 * GIB)

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fractions: list[float] = []
        properties = type("Properties", (), {"total_memory": self.total})
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: properties)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (self.free, self.total))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: self.reserved)
        monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", self.fractions.append)
        monkeypatch.setattr(checkpointing, "outside_torch_bytes", lambda: self.outside)


def test_memory_budget_counts_the_memory_outside_torch(monkeypatch: pytest.MonkeyPatch, params: Any) -> None:
    """execution.memory_budget_gib is the card's memory, as NVML counts it: torch may hold the budget less what the
    CUDA context holds, never more than it holds plus what is free; without a budget, all of that."""
    gpu = FakeGpu(monkeypatch)
    assert checkpointing.torch_room_bytes(16) == 16 * GIB - gpu.outside
    assert checkpointing.torch_room_bytes(None) == checkpointing.torch_room_bytes(100) == 70 * GIB
    assert checkpointing.limit_gpu_memory(16) == pytest.approx(14.8)
    assert gpu.fractions == [pytest.approx(14.8 / 80)]
    assert checkpointing.limit_gpu_memory(None) is None and gpu.fractions[-1] == 1.0  # the whole GPU again
    too_small = r"^execution\.memory_budget_gib: 1 GiB does not cover the 1\.20 GiB"
    with pytest.raises(checkpointing.ParamsError, match=too_small):
        checkpointing.limit_gpu_memory(1)
    # The plans size themselves to the same room.
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 0)
    model = type("Model", (), {"config": type("Config", (), {"hidden_size": 64, "intermediate_size": 128})})()
    budget = dataclasses.replace(params.execution, memory_budget_gib=8.0)
    params = dataclasses.replace(params, execution=budget)
    monkeypatch.setattr(checkpointing, "decoder_layers", lambda model: [None] * 2)
    assert checkpointing.planned_budget(model, params, 512)["budget_bytes"] == 8 * GIB - gpu.outside


# Llama-2-7B's shape, and what the H200 measured with micro-batch 16 packed and every layer checkpointed: 4.12 GiB
# allocated by the 4-bit model with LoRA, peak 6.98 GiB over batches of up to about 4,500 tokens.
LLAMA = {"layers": 32, "hidden": 4096, "intermediate": 11008}


def test_layers_to_checkpoint_fits_the_budget() -> None:
    fixed = 4.12 * GIB + 12 * 40e6
    plans = {
        b: checkpointing.layers_to_checkpoint(b * GIB, fixed, **LLAMA, max_tokens=6000) for b in (8, 16, 24, 48, 141)
    }
    count = {b: layers for b, (layers, _) in plans.items()}
    # Not even all checkpointed fits at 8 GiB (6,000 tokens): all are, and the fewest layers' inputs go to the host
    # for the rest to fit; offloading one layer fewer would not.
    layers, offloaded = plans[8]
    room = checkpointing.all_checkpointed_room(
        8 * GIB, fixed, **LLAMA, max_tokens=6000, share=checkpointing.BUDGET_SHARE
    )
    saved = 2 * 4096 * 6000
    assert layers == 32 and 0 < offloaded < 32 and room + offloaded * saved >= 0 > room + (offloaded - 1) * saved
    assert checkpointing.layers_to_checkpoint(4 * GIB, fixed, **LLAMA, max_tokens=6000) == (32, 32)  # all, too few
    assert not any(offloaded for b, (_, offloaded) in plans.items() if b > 8)
    assert 32 > count[16] > count[24] > count[48] > 0  # more memory, fewer layers recomputed
    assert count[141] == 0  # the H200 without a budget: nothing recomputed
    # The plan never exceeds its share of the budget: every checkpointed layer keeps its input, the others all.
    kept = checkpointing.kept_layer_bytes(4096, 11008) * 6000
    planned = fixed + count[16] * saved + (32 - count[16]) * kept + kept
    assert planned <= checkpointing.BUDGET_SHARE * 16 * GIB
    assert planned + (kept - saved) > checkpointing.BUDGET_SHARE * 16 * GIB  # one layer fewer would not fit
    # The all-checkpointed plan reproduces the H200's measured peak (6.98 GiB at about 4,500 tokens) within 10%.
    peak = 4.12 * GIB + 12 * 40e6 + 32 * 2 * 4096 * 4500 + checkpointing.kept_layer_bytes(4096, 11008) * 4500
    assert peak == pytest.approx(6.98 * GIB, rel=0.1)


def test_checkpointed_layer_count(monkeypatch: pytest.MonkeyPatch, params: Any) -> None:
    import dataclasses

    from conftest import tiny_llama_config
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = get_peft_model(LlamaForCausalLM(tiny_llama_config()), LoraConfig(r=4, target_modules=["q_proj"]))

    def plan(value: Any, budget: float | None = None, tokens: int | None = 512, offload: Any = "auto") -> Any:
        execution = dataclasses.replace(params.execution, gradient_checkpointing=value, memory_budget_gib=budget)
        execution = dataclasses.replace(execution, offload_checkpoints=offload)
        return checkpointing.checkpointed_layer_count(model, dataclasses.replace(params, execution=execution), tokens)

    def resolved(value: Any, budget: float | None = None, tokens: int | None = 512) -> int:
        return plan(value, budget, tokens)[0]

    assert plan(True) == (2, 0) and plan(False) == (0, 0) and plan(True, offload=True) == (2, 2)
    assert plan("auto") == (2, 0)  # a CPU: all, in memory the host has anyway
    monkeypatch.setattr(checkpointing, "gpu_memory_gib", lambda: 141.0)
    monkeypatch.setattr(checkpointing, "torch_room_bytes", lambda budget: (budget or 141.0) * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 0)
    assert plan("auto") == (0, 0)  # tiny model, big GPU: none
    assert plan("auto", budget=1e-6) == (2, 2)  # no room at all: every layer, offloaded
    assert plan("auto", budget=1e-6, offload=False) == (2, 0)
    # Between no room and room enough, auto checkpoints some of the layers: fewer the larger the budget.
    counts = [resolved("auto", budget=float(b)) for b in np.geomspace(1e-5, 1.0, 200)]
    assert counts == sorted(counts, reverse=True) and set(counts) == {2, 1, 0}
    monkeypatch.undo()
    monkeypatch.setattr(checkpointing, "gpu_memory_gib", lambda: 141.0)
    monkeypatch.setattr(checkpointing, "torch_room_bytes", lambda budget: (budget or 141.0) * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 0)
    # Without a token count the worst case is planned for: micro_batch x max_length.
    assert resolved("auto", budget=1e-3, tokens=None) >= resolved("auto", budget=1e-3, tokens=64)

    checkpointing.set_checkpointed_layers(model, 1)
    assert [layer.gradient_checkpointing for layer in checkpointing.decoder_layers(model)] == [True, False]
    assert checkpointing.switch_on_checkpointing(model) == "gradient checkpointing on"  # some layers off: all on now
    assert [layer.gradient_checkpointing for layer in checkpointing.decoder_layers(model)] == [True, True]
    assert checkpointing.switch_on_checkpointing(model) is None  # offloading not allowed: nothing left
    checkpointing.set_checkpointed_layers(model, 1, 1)  # one layer, offloaded: the back-off keeps it offloaded
    assert checkpointing.switch_on_checkpointing(model) == "gradient checkpointing on"
    assert checkpointing.offloaded_layers(model) == 1 and checkpointing.checkpointed_layers(model) == 2
    assert "offloaded" in checkpointing.switch_on_checkpointing(model, offload=True)
    assert (
        checkpointing.offloaded_layers(model) == 2
        and checkpointing.switch_on_checkpointing(model, offload=True) is None
    )


def test_misspelled_lora_target_is_refused_with_the_names_there_are() -> None:
    """One misspelled target of seven: PEFT would adapt the other six and say nothing."""
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM(tiny_llama_config())
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    modeling.check_lora_targets(base, "llama", projections)  # the real names pass
    with pytest.raises(modeling.ParamsError) as err:
        modeling.check_lora_targets(base, "llama", [*projections[:6], "dwn_proj"])
    message = str(err.value)
    assert message.startswith("models.llama.lora_targets: dwn_proj names no module of this model")
    assert "down_proj" in message and "lm_head" in message  # the linear layers a user can choose from


def test_offloaded_checkpoints_give_the_same_loss_and_gradients() -> None:
    """execution.offload_checkpoints: every layer checkpointed with its input kept in host memory computes the loss
    and LoRA gradients of the plain non-reentrant checkpointing, dropout masks included (fp32 on a CPU: to rounding)."""
    from conftest import tiny_llama_config
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config())
    batch = {"input_ids": torch.randint(1, 300, (2, 24)), "labels": torch.randint(1, 300, (2, 24))}
    results = []
    for offloaded in (0, 1, 2):  # none, the first layer only (a budget's plan), both
        torch.manual_seed(1)
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"])
        model = get_peft_model(copy.deepcopy(base), config)
        for name, param in model.named_parameters():  # B away from zero, so the adapters shape the gradients
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
        model.train()
        checkpointing.set_checkpointed_layers(model, 2, offloaded)
        assert checkpointing.offloaded_layers(model) == offloaded
        torch.manual_seed(2)
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (loss, grads), *offloaded_results = results
    for offloaded_loss, offloaded_grads in offloaded_results:
        assert torch.allclose(loss, offloaded_loss, atol=1e-6)
        assert grads.keys() == offloaded_grads.keys() and len(grads) == 12
        for name in grads:
            assert torch.allclose(grads[name], offloaded_grads[name], atol=1e-6, rtol=1e-5), name
    # Set back to none offloaded, the layers checkpoint on the GPU again.
    checkpointing.set_checkpointed_layers(model, 2, 0)
    assert checkpointing.offloaded_layers(model) == 0 and checkpointing.checkpointed_layers(model) == 2


@pytest.mark.parametrize("offload_checkpoints", [False, True])
def test_embeddings_in_host_memory_give_the_same_loss_and_gradients(offload_checkpoints: bool) -> None:
    """execution.offload_embeddings: the input embedding table in host memory and the collator's inputs_embeds give
    the loss and LoRA gradients of the embedding on the model, dropout masks included; with offloaded (reentrant)
    checkpoints too, which pass gradients only to inputs that want them. The model holds the table no more."""
    from conftest import tiny_llama_config
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from duel.embeddings import HostEmbedding, offload_input_embeddings
    from duel.training import AnswerCollator, answer_loss

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config())
    features = [{"input_ids": torch.randint(1, 300, (n,)).tolist(), "answer_id": 7} for n in (9, 14, 5)]
    results = []
    for offload in (False, True):
        loaded = copy.deepcopy(base)
        table = offload_input_embeddings(loaded) if offload else None
        torch.manual_seed(1)
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"])
        model = get_peft_model(loaded, config)
        for name, param in model.named_parameters():  # B away from zero, so the adapters shape the gradients
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
        model.train()
        checkpointing.set_checkpointed_layers(model, 2, 2 if offload_checkpoints else 0)
        batch = AnswerCollator(0, "flattened", 128, embeddings=table)(features)
        assert ("inputs_embeds" in batch, "input_ids" in batch) == (offload, not offload)
        assert isinstance(model.get_input_embeddings(), HostEmbedding) == offload
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters()) - offload * (
            300 * 32
        ) + sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        torch.manual_seed(2)
        labels = batch.pop("labels")
        loss = answer_loss(model(**batch), labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss, grads), (offloaded_loss, offloaded_grads) = results
    assert torch.allclose(loss, offloaded_loss, atol=1e-6)
    assert grads.keys() == offloaded_grads.keys() and len(grads) == 12
    for name in grads:
        assert torch.allclose(grads[name], offloaded_grads[name], atol=1e-6, rtol=1e-5), name


def test_embeddings_offloaded_when_all_checkpointed_would_not_fit(monkeypatch: pytest.MonkeyPatch, params: Any) -> None:
    """execution.offload_embeddings resolved: true and false as set; auto never on a CPU nor beside CUDA graphs, and
    on a GPU only when training with every layer checkpointed would not fit the budget."""
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    loaded = LlamaForCausalLM(tiny_llama_config())

    def wanted(value: Any, budget: float | None = None, graphs: bool = False) -> bool:
        execution = dataclasses.replace(params.execution, offload_embeddings=value, memory_budget_gib=budget)
        execution = dataclasses.replace(execution, cuda_graphs=graphs)
        resolved = dataclasses.replace(params, execution=execution)
        return modeling.embeddings_offloaded(loaded, resolved.model("llama"), resolved, 512)

    assert (wanted(True), wanted(False), wanted("auto"), wanted("auto", budget=1e-6)) == (True, False, False, False)
    monkeypatch.setattr(modeling, "gpu_memory_gib", lambda: 80.0)
    monkeypatch.setattr(checkpointing, "torch_room_bytes", lambda budget: (budget or 80.0) * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 0)
    assert not wanted("auto") and wanted("auto", budget=1e-6)  # room enough; no room at all
    assert not wanted("auto", budget=1e-6, graphs=True)  # a captured graph replays token ids
    with pytest.raises(modeling.ParamsError, match=r"^execution\.offload_embeddings: true cannot be captured"):
        dataclasses.replace(params.execution, offload_embeddings=True, cuda_graphs=True)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dequantized_base_trains_like_the_4bit_base(params: Any, tmp_path: Any, precision: str) -> None:
    """execution.dequantize_base: LoRA on the base dequantized once, in one of its two decoder layers or in both,
    computes the loss and LoRA gradients of LoRA on the 4-bit base, dropout masks included, in fp32 and under bf16
    autocast (bitsandbytes' CPU kernels round a little differently from a plain product; tests/test_gpu.py checks
    CUDA)."""
    import dataclasses

    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    from duel.io import write_json

    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    LlamaForCausalLM(tiny_llama_config(hidden_size=64, intermediate_size=128)).save_pretrained(base_dir)
    write_json(base_dir / "model.json", {"path": str(base_dir)})
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[precision]
    execution = dataclasses.replace(params.execution, precision=precision, compute_dtype=dtype)
    quantization = dataclasses.replace(params.quantization, enabled=True)
    lora = dataclasses.replace(params.lora, dropout=0.1)
    small = dataclasses.replace(params, quantization=quantization, execution=execution, lora=lora)
    batch = {"input_ids": torch.randint(1, 300, (2, 24)), "labels": torch.randint(1, 300, (2, 24))}
    results = []
    for count, weights in ((0, "4-bit"), (1, "partly dequantized"), (2, "unquantized")):
        loaded = modeling.load_base_model(base_dir, small.model("llama"), small, "sdpa")
        loaded = modeling.dequantize_layers(loaded, count)
        torch.manual_seed(1)
        model = modeling.add_lora(loaded, small.model("llama"), small)
        for name, param in model.named_parameters():  # B away from zero, so the adapters shape the gradients
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
        assert modeling.base_weights(model) == weights and modeling.dequantized_layers(model, True) == count
        model.train()
        torch.manual_seed(2)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    loss, grads = results[0]
    rounding = 1e-3  # of the largest gradient: a kernel's rounding, not another dropout mask
    for dequantized_loss, dequantized_grads in results[1:]:
        assert torch.allclose(loss, dequantized_loss, rtol=rounding)
        assert grads.keys() == dequantized_grads.keys() and len(grads) == 28
        worst = max(float((dequantized_grads[n] - g).abs().max() / g.abs().max()) for n, g in grads.items())
        print(f"{precision}: largest gradient difference {worst:.3g} of the tensor's largest")
        assert worst < rounding


def test_dequantized_layer_count(monkeypatch: pytest.MonkeyPatch, params: Any, tmp_path: Any) -> None:
    """execution.dequantize_base resolved: true all layers, false none; auto none on a CPU (the 4-bit base the demo
    has always trained), all on a big GPU, and under a budget the more layers the more memory; none without
    quantization."""
    import dataclasses

    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    from duel.io import write_json

    LlamaForCausalLM(tiny_llama_config(hidden_size=64, intermediate_size=128)).save_pretrained(tmp_path)
    write_json(tmp_path / "model.json", {"path": str(tmp_path)})
    quantized = dataclasses.replace(params, quantization=dataclasses.replace(params.quantization, enabled=True))
    loaded = modeling.load_base_model(tmp_path, quantized.model("llama"), quantized, "sdpa")

    def count(value: Any, budget: float | None = None, tokens: int | None = 512, quantize: bool = True) -> int:
        execution = dataclasses.replace(params.execution, dequantize_base=value, memory_budget_gib=budget)
        quantization = dataclasses.replace(params.quantization, enabled=quantize)
        resolved = dataclasses.replace(params, execution=execution, quantization=quantization)
        return modeling.dequantized_layer_count(loaded, resolved.model("llama"), resolved, tokens)

    assert (count(True), count(False), count("auto")) == (2, 0, 0)  # a CPU: auto keeps the 4-bit base
    assert count(True, quantize=False) == 0  # nothing to dequantize
    monkeypatch.setattr(modeling, "gpu_memory_gib", lambda: 80.0)
    monkeypatch.setattr(checkpointing, "torch_room_bytes", lambda budget: (budget or 80.0) * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 0)
    assert count("auto") == 2 and count("auto", budget=1e-6) == 0  # a big GPU: all; no room: none
    counts = [count("auto", budget=float(b)) for b in np.geomspace(1e-4, 1e-2, 200)]
    assert counts == sorted(counts) and set(counts) == {0, 1, 2}  # the larger the budget, the more layers
    # Without a token count the worst case is planned for: micro_batch x max_length.
    assert count("auto", budget=3e-3, tokens=None) <= count("auto", budget=3e-3, tokens=64)


def test_layers_to_dequantize_fill_the_budget_before_unchecked_layers() -> None:
    """Llama-2-7B's shape at 6,000 tokens a micro-batch: the dequantized layers (0.28 GiB more each) fill what
    training with every layer checkpointed leaves of the budget, and the checkpointing plan made after them then
    leaves every layer checkpointed, within the budget's share."""
    fixed, layer_bytes, share = 4.12 * GIB + 12 * 40e6, 1.5 * 202e6, checkpointing.EXPANDABLE_SHARE
    plans = {
        b: checkpointing.layers_to_dequantize(b * GIB, fixed, **LLAMA, max_tokens=6000, layer_bytes=layer_bytes)
        for b in (8, 12, 16, 24, 48)
    }
    assert plans[8] == 0 and 0 < plans[12] < plans[16] < plans[24] == plans[48] == 32
    for budget in (12, 16):
        count = checkpointing.layers_to_dequantize(
            budget * GIB, fixed, **LLAMA, max_tokens=6000, layer_bytes=layer_bytes, share=share
        )
        after = fixed + count * layer_bytes
        plan = checkpointing.layers_to_checkpoint(budget * GIB, after, **LLAMA, max_tokens=6000, share=share)
        assert plan == (32, 0)
        more = fixed + (count + 1) * layer_bytes  # one layer more would not fit all-checkpointed training
        assert checkpointing.all_checkpointed_room(budget * GIB, more, **LLAMA, max_tokens=6000, share=share) < 0
    # The allocator decides the share: expandable segments leave less slack.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(checkpointing.ALLOCATOR_ENV, checkpointing.EXPANDABLE)
        assert checkpointing.budget_share() == checkpointing.EXPANDABLE_SHARE
        patch.delenv(checkpointing.ALLOCATOR_ENV)
        assert checkpointing.budget_share() == checkpointing.BUDGET_SHARE
