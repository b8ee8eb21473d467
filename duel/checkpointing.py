"""Gradient checkpointing by decoder layer, and the memory model that picks how many layers to checkpoint."""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from duel.params import Params, ParamsError
from duel.telemetry import outside_torch_bytes


def gpu_memory_gib() -> float | None:
    """The GPU's memory in GiB (the process's first CUDA device), or None on a machine without one."""
    return torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None


ALLOCATOR_ENV, EXPANDABLE = "PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"


def configure_allocator(expandable_segments: bool) -> str | None:
    """execution.expandable_segments: torch's CUDA caching allocator maps more memory into the segments it has instead
    of caching a block of every size the varying micro-batches ask for: PYTORCH_CUDA_ALLOC_CONF for this process's
    children, and torch's own setter for this one. A PYTORCH_CUDA_ALLOC_CONF already in the environment is kept as it
    is. Returns the setting in force (None: torch's default)."""
    if expandable_segments and ALLOCATOR_ENV not in os.environ:
        os.environ[ALLOCATOR_ENV] = EXPANDABLE  # inherited by torchrun's ranks
        if torch.cuda.is_available():  # CUDA may be up already: bitsandbytes asks for the GPU's capability on import
            setting = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch >= 2.9
            (setting or torch.cuda.memory._set_allocator_settings)(EXPANDABLE)
    return os.environ.get(ALLOCATOR_ENV)


def torch_room_bytes(budget_gib: float | None) -> float:
    """What torch's caching allocator may hold on this process's GPU: what it holds plus what the GPU has free, and
    with execution.memory_budget_gib no more than the budget less the memory outside torch (outside_torch_bytes). The
    budget counts the device's memory as NVML does (nvml_peak_gib, nvidia-smi), so that a run within 8 GiB fits a
    card of 8 GiB; the CUDA context alone holds about 1.2 GiB (H100) to 1.35 GiB (H200) at a fine-tune's peak."""
    free, _ = torch.cuda.mem_get_info()
    room = torch.cuda.memory_reserved() + free
    if not budget_gib:
        return room
    outside = outside_torch_bytes()
    if budget_gib * 2**30 <= outside:
        raise ParamsError(
            f"execution.memory_budget_gib: {budget_gib:g} GiB does not cover the {outside / 2**30:.2f} GiB the GPU "
            "already holds outside torch (the CUDA context, kernels, other processes); raise it"
        )
    return min(room, budget_gib * 2**30 - outside)


def limit_gpu_memory(budget_gib: float | None) -> float | None:
    """execution.memory_budget_gib: cap torch's caching allocator at torch_room_bytes (none: the whole GPU, torch's
    default); the finetune stage calls it again after its first optimizer step, once the kernels that step loaded
    hold their memory. Returns the cap in GiB; None without a budget or a GPU."""
    if not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    room = torch_room_bytes(budget_gib) if budget_gib else total
    torch.cuda.set_per_process_memory_fraction(min(1.0, room / total))
    return room / 2**30 if budget_gib else None


def decoder_layers(model: Any) -> list[Any]:
    """The model's decoder layers, the units transformers checkpoints."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_checkpointed_layers(model: Any, count: int, offloaded: int = 0) -> None:
    """Gradient checkpointing (non-reentrant) on the first `count` decoder layers and off on the others; the first
    `offloaded` of them keep their input in host memory instead (offloaded_checkpoint), the others on the GPU."""
    if count and not model.is_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if offloaded:
        model.enable_input_require_grads()  # a reentrant checkpoint passes gradients only to inputs that want them
    for i, layer in enumerate(decoder_layers(model)):
        layer.gradient_checkpointing = i < count
        current = getattr(layer, "_gradient_checkpointing_func", None)
        if current is not None and current is not offloaded_checkpoint:
            layer._gpu_checkpoint_func = current  # transformers' own, to put back
        if i < min(count, offloaded):
            layer._gradient_checkpointing_func = offloaded_checkpoint
        elif current is offloaded_checkpoint:
            layer._gradient_checkpointing_func = layer._gpu_checkpoint_func


def offloaded_checkpoint(function: Any, *args: Any) -> Any:
    """A checkpointed decoder layer whose input waits for the backward pass in host memory (pinned, on a GPU): the
    forward runs without keeping activations (torch's reentrant checkpoint, which saves only its inputs, and those
    through save_on_cpu), and the backward pass brings the input back and recomputes the layer, the same dropout
    masks included (its RNG state is restored). What it saves is the inputs' memory: 2 bytes x hidden per token and
    layer, 1.5 GiB for a 7B model at 6,000 tokens a micro-batch."""
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=True)


def offloaded_layers(model: Any) -> int:
    """How many decoder layers keep their checkpointed input in host memory."""
    return sum(
        getattr(layer, "_gradient_checkpointing_func", None) is offloaded_checkpoint for layer in decoder_layers(model)
    )


def checkpointed_layers(model: Any) -> int:
    """How many decoder layers have gradient checkpointing on."""
    return sum(layer.gradient_checkpointing for layer in decoder_layers(model))


def switch_on_checkpointing(model: Any, offload: bool = False) -> str | None:
    """Keep less memory in a model being trained, the next way: gradient checkpointing in every decoder layer, then
    (when `offload` allows) their inputs in host memory; what it did, or None when there is nothing left to do."""
    layers = len(decoder_layers(model))
    if checkpointed_layers(model) < layers:
        set_checkpointed_layers(model, layers, offloaded_layers(model))
        return "gradient checkpointing on"
    if offload and offloaded_layers(model) < layers:
        set_checkpointed_layers(model, layers, layers)
        return "every checkpointed layer's input offloaded to host memory"
    return None


# Activations one decoder layer keeps for the backward pass when it is not recomputed, per token, in bytes. Measured
# on the H200 (benchmarks: sweep of checkpointed layers, both 7B models, micro-batch 16 packed, bf16, LoRA on all
# seven projections with dropout): 0.23 MiB per token and layer, which is 2 bytes x (5 x intermediate + 16 x hidden)
# for their shapes.
def kept_layer_bytes(hidden: int, intermediate: int) -> int:
    return 2 * (5 * intermediate + 16 * hidden)


# Of the memory budget planned for; the rest is the allocator's slack. On the H100 (Llama-2), torch's default caching
# allocator filled a 16 GiB budget with 11.1 GiB allocated (blocks cached for micro-batches of every length); with
# expandable segments it reserved 0.15 GiB more than it allocated at 8 GiB, 0.3 at 16 and 1.0 at 48.
BUDGET_SHARE, EXPANDABLE_SHARE = 0.85, 0.95


def budget_share() -> float:
    """The share of the budget planned for under the allocator this process runs (configure_allocator)."""
    return EXPANDABLE_SHARE if EXPANDABLE in os.environ.get(ALLOCATOR_ENV, "") else BUDGET_SHARE


def all_checkpointed_room(
    budget_bytes: float, fixed_bytes: float, layers: int, hidden: int, intermediate: int, max_tokens: int, share: float
) -> float:
    """The budget's planned share left over by training with every decoder layer checkpointed: each keeps its input
    (max_tokens x hidden values in bf16), and the backward pass recomputes one layer at a time, which then keeps all
    its activations (kept_layer_bytes per token). fixed_bytes: weights, LoRA, gradients, optimizer. Negative when
    even that does not fit."""
    return (
        share * budget_bytes
        - fixed_bytes
        - layers * 2 * hidden * max_tokens
        - kept_layer_bytes(hidden, intermediate) * max_tokens
    )


def layers_to_checkpoint(
    budget_bytes: float,
    fixed_bytes: float,
    layers: int,
    hidden: int,
    intermediate: int,
    max_tokens: int,
    share: float = BUDGET_SHARE,
) -> tuple[int, int]:
    """The fewest decoder layers to recompute so that training fits the budget: a layer not checkpointed keeps all
    its activations instead of its input (all_checkpointed_room). Beside it, when even all layers do not fit, the
    fewest of them whose inputs must wait in host memory (offloaded_checkpoint) for the rest to fit, each saving its
    input's 2 bytes x hidden per token (all of them when that is not enough either)."""
    kept, saved = kept_layer_bytes(hidden, intermediate) * max_tokens, 2 * hidden * max_tokens
    room = all_checkpointed_room(budget_bytes, fixed_bytes, layers, hidden, intermediate, max_tokens, share)
    short = min(layers, math.ceil(-room / saved)) if room < 0 else 0
    return layers - min(layers, max(0, int(room // (kept - saved)))), short


def layers_to_dequantize(
    budget_bytes: float,
    fixed_bytes: float,
    layers: int,
    hidden: int,
    intermediate: int,
    max_tokens: int,
    layer_bytes: float,
    share: float = BUDGET_SHARE,
) -> int:
    """How many decoder layers can hold their frozen projections dequantized (layer_bytes more each than in 4 bits)
    beside training with every layer checkpointed; the room left after them goes to layers not checkpointed
    (layers_to_checkpoint, planned once they are dequantized). Dequantizing comes first because it buys more speed
    per GiB: on the H100, Llama-2 trained 1.52x faster on the dequantized base without checkpointing (47.6 against
    31.3 reviews/s) for 8.9 GiB, while 8 more layers unchecked (22 of 32 checkpointed at 24 GiB against 30 at
    12 GiB) bought 1.05x (29.2 against 27.7) for 8.4 GiB."""
    room = all_checkpointed_room(budget_bytes, fixed_bytes, layers, hidden, intermediate, max_tokens, share)
    return min(layers, max(0, int(room // layer_bytes)))


def checkpointed_layer_count(model: Any, params: Params, max_tokens: int | None) -> tuple[int, int]:
    """execution.gradient_checkpointing resolved to a number of decoder layers: true all, false none; auto all on a CPU
    and, on a GPU, the fewest that fit execution.memory_budget_gib (the GPU's memory when unset) for micro-batches of
    max_tokens tokens (micro_batch x max_length when not given; layers_to_checkpoint): none on the H200 without a
    budget. With varlen attention, checkpointing all but 4 layers ran 1.13-1.16x faster than all in the H200 sweep
    (with SDPA's masked attention it had run slower, 0.81-0.86x). An out-of-memory error later switches all on.
    Beside it, execution.offload_checkpoints resolved to the number of those layers whose inputs wait in host memory:
    true all, false none, auto the fewest that let all-checkpointed training fit (layers_to_checkpoint)."""
    layers = len(decoder_layers(model))
    wanted, offload = params.execution.gradient_checkpointing, params.execution.offload_checkpoints
    total = gpu_memory_gib()
    if wanted != "auto":
        return (layers, layers if offload is True else 0) if wanted else (0, 0)
    if total is None:
        return layers, layers if offload is True else 0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fixed = torch.cuda.memory_allocated() + 12 * trainable  # fp32 gradient and AdamW's two moments per LoRA weight
    count, short = layers_to_checkpoint(fixed_bytes=fixed, **planned_budget(model, params, max_tokens))
    return count, count if offload is True else short if offload == "auto" else 0


def planned_budget(model: Any, params: Params, max_tokens: int | None) -> dict[str, float]:
    """The arguments the memory plans (layers_to_checkpoint, layers_to_dequantize) share, all but fixed_bytes: the
    bytes torch may hold (torch_room_bytes: execution.memory_budget_gib less the memory outside torch, else the GPU's
    memory), the model's decoder layers, hidden and intermediate sizes, the tokens of the largest micro-batch
    (micro_batch x max_length when max_tokens is not given), and the share of the budget planned for under this
    process's allocator."""
    config = model.config
    return {
        "budget_bytes": torch_room_bytes(params.execution.memory_budget_gib),
        "layers": len(decoder_layers(model)),
        "hidden": config.hidden_size,
        "intermediate": config.intermediate_size,
        "max_tokens": max_tokens or params.execution.micro_batch * params.data.max_length,
        "share": budget_share(),
    }
