"""Load the models for training and scoring: 4-bit NF4 through bitsandbytes, the attention and fused kernels asked
for, LoRA through PEFT, and an adapter merged into a dequantized base for scoring."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from duel import attention
from duel.checkpointing import (
    all_checkpointed_room,
    checkpointed_layer_count,
    decoder_layers,
    gpu_memory_gib,
    layers_to_dequantize,
    planned_budget,
    set_checkpointed_layers,
)
from duel.embeddings import offload_input_embeddings
from duel.errors import ParamsError
from duel.io import read_json
from duel.params import ExecutionParams, ModelParams, Params, QuantizationParams

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def attention_implementation(requested: str, packed: bool, graphs: bool = False) -> str:
    """execution.attention resolved for training on packed rows (packed true) or for batches of left-padded reviews (the
    paper's padding, and scoring). auto: flash_attention_2 where flash-attn is installed; else, for packed rows on
    CUDA, varlen (PyTorch's own variable-length Flash Attention, duel.attention); else sdpa. varlen asked for
    padded batches gives sdpa, and so does flex_attention (each new batch shape would compile its kernel again).
    Under CUDA graphs (execution.cuda_graphs) auto is varlen, and only varlen will do:
    transformers' Flash Attention 2 path looks for packed sequences with a host synchronisation, which a capture
    forbids."""
    if graphs and requested not in ("auto", attention.VARLEN):
        raise ParamsError(
            f"execution.attention: {requested} cannot be captured with execution.cuda_graphs; set auto or varlen"
        )
    if graphs:
        requested = attention.VARLEN
    if requested == attention.FLEX and packed and not torch.cuda.is_available():
        raise ParamsError(
            "execution.attention: flex_attention trains on a CUDA GPU only (PyTorch's FlexAttention has no backward "
            "pass on the CPU); set auto or sdpa"
        )
    if requested == attention.VARLEN and not attention.varlen_available():
        raise ParamsError(
            "execution.attention: varlen needs an Ampere or newer CUDA GPU and PyTorch 2.9 or newer "
            "(torch.nn.attention.varlen); set auto or sdpa"
        )
    if requested == "auto":
        if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
            return "flash_attention_2"
        requested = attention.VARLEN if packed and attention.varlen_available() else "sdpa"
    return "sdpa" if requested in (attention.VARLEN, attention.FLEX) and not packed else requested


def quantization_config(params: QuantizationParams, compute_dtype: str) -> BitsAndBytesConfig | None:
    if not params.enabled:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=params.quant_type,
        bnb_4bit_use_double_quant=params.double_quant,
        bnb_4bit_compute_dtype=DTYPES[compute_dtype],
    )


def quantization_name(params: QuantizationParams) -> str:
    """nf4-dq for 4-bit NF4 with double quantization, none without quantization."""
    if not params.enabled:
        return "none"
    return f"{params.quant_type}{'-dq' if params.double_quant else ''}"


# Liger through transformers' integration (the Trainer's use_liger_kernel): the loss is ours, so the model's forward
# and its cross-entropy stay as they are.
LIGER_CONFIG = {
    "rope": True,
    "rms_norm": True,
    "swiglu": True,
    "cross_entropy": False,
    "fused_linear_cross_entropy": False,
}


def kernels_implementation(requested: str, compiled: bool = False) -> str:
    """execution.kernels resolved: auto is liger on a CUDA machine where liger-kernel is installed, else none. For
    compiled layers (execution.compile) auto is none: inductor fuses those operations itself, and dynamo (torch 2.11)
    fails on Liger's RMSNorm function, so liger with compile is an error."""
    installed = all(importlib.util.find_spec(name) is not None for name in ("liger_kernel", "triton"))
    if requested == "liger" and not installed:
        raise ParamsError(
            "execution.kernels: liger needs the liger-kernel and triton packages "
            "(pip install -r requirements-gpu.txt); or set it to auto or none"
        )
    if requested == "liger" and compiled:
        raise ParamsError(
            "execution.kernels: liger cannot be compiled (dynamo fails on Liger's RMSNorm); with "
            "execution.compile: true set it to auto or none (inductor fuses those operations itself)"
        )
    if requested == "auto":
        return "liger" if installed and torch.cuda.is_available() and not compiled else "none"
    return requested


def load_base_model(
    base_dir: Path, model: ModelParams, params: Params, attention_kind: str, kernels: str = "none"
) -> PreTrainedModel:
    """The base model, 4-bit when quantization is on, on the GPU when there is one, with the fused kernels asked
    for (kernels_implementation); no adapter yet."""
    info = read_json(base_dir / "model.json")
    if attention_kind == attention.VARLEN:
        attention.register()  # with transformers' AttentionInterface, under the name "varlen"
    device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}  # a rank's own GPU
    loaded = AutoModelForCausalLM.from_pretrained(
        info["path"],  # a local folder: the random checkpoint, or the pinned hub snapshot
        dtype=DTYPES[params.execution.compute_dtype],
        quantization_config=quantization_config(params.quantization, params.execution.compute_dtype),
        attn_implementation=attention_kind,
        device_map=device_map,
        use_safetensors=True,
        trust_remote_code=model.trust_remote_code,
        local_files_only=True,
    )
    loaded.config.use_cache = False  # no generation here; the KV cache only costs memory in training
    apply_kernels(loaded, kernels)
    return loaded


def apply_kernels(model: Any, kernels: str) -> None:
    """Swap in the fused kernels kernels_implementation resolved to (a model, or a PEFT model around one)."""
    if kernels == "liger":
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(model, LIGER_CONFIG)


def add_lora(base: PreTrainedModel, model: ModelParams, params: Params, max_tokens: int | None = None) -> Any:
    """Freeze the base, add the LoRA adapter, and switch on gradient checkpointing (non-reentrant) in as many decoder
    layers as checkpointed_layer_count says for micro-batches of at most `max_tokens` tokens.

    With quantization.upcast_fp32 this goes through PEFT's prepare_model_for_kbit_training, which also casts the
    unquantized weights (norms, embeddings, head) to fp32, as the paper's stack does; without it they stay in the
    compute dtype and the residual stream is half as many bytes.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if params.quantization.enabled and params.execution.upcast_fp32:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    else:
        base.requires_grad_(False)
    lora = LoraConfig(
        r=params.lora.r,
        lora_alpha=params.lora.alpha,
        lora_dropout=params.lora.dropout,
        target_modules=model.lora_targets,
        task_type="CAUSAL_LM",
    )
    adapted = get_peft_model(base, lora)
    dequantized_base = params.quantization.enabled and base_weights(adapted) != "4-bit"  # in some layers at least
    on_cuda = next(adapted.parameters()).device.type == "cuda"  # the autocast PEFT's 4-bit layer looks at
    if dequantized_base and on_cuda and params.execution.precision != "fp32":
        keep_lora_inputs_uncast(adapted)
    set_checkpointed_layers(adapted, *checkpointed_layer_count(adapted, params, max_tokens))
    return adapted


def keep_lora_inputs_uncast(model: Any) -> None:
    """LoRA beside a dequantized base computes as beside the 4-bit layer: under CUDA autocast PEFT leaves the 4-bit
    layer's input in the compute dtype for the adapter's dropout and products, while beside a plain layer it first
    casts it to the adapter's fp32 (a kernel more per projection, and dropout then draws its mask for fp32). Beside
    a 4-bit layer the flag changes nothing."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = False


def check_lora_targets(base: PreTrainedModel, key: str, targets: list[str]) -> None:
    """Every name in models.<key>.lora_targets must name modules of the model: PEFT adapts the names that match and
    says nothing of one misspelled among seven, so the adapter would silently train on fewer projections."""
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in base.named_modules() if isinstance(m, torch.nn.Linear)})
    named = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    missing = [target for target in targets if target not in named]
    if missing:
        raise ParamsError(
            f"models.{key}.lora_targets: {', '.join(missing)} names no module of this model; its linear layers are "
            f"{', '.join(linear)}"
        )


def compile_layers(model: Any, wanted: bool) -> None:
    """execution.compile: torch.compile each decoder layer in place (regional compilation: one layer's code is compiled
    once and serves all of them; dynamic shapes, so rows of new lengths do not recompile). Checkpointing stays
    outside the compiled code, so the OOM back-off can still switch it on.

    The input embeddings' output is made to require a gradient (enable_input_require_grads, as reentrant
    checkpointing needs too), so that the first layer's input is like every other's: otherwise the first layer
    compiles graphs of its own, twice the graphs (the finetune stage on a 2-core CPU, Llama-2's demo model without
    checkpointing, 3 steps: 32.2 s compiling cold and 6.7 s warm, against 22.3 and 4.8 s with it, the
    same losses), for the gradient of one layer's input (its projections' input gradients: about 1% more FLOPs over
    32 layers; what LoRA learns is unchanged)."""
    if wanted:
        model.enable_input_require_grads()
        for layer in decoder_layers(model):
            layer.compile(dynamic=True)


def compile_summary() -> dict[str, Any]:
    """What compiling the layers cost this process: graphs compiled afresh (a cold start), graphs taken from inductor's
    on-disk cache (a warm one), and the seconds dynamo spent on both (the forward at the first call, the backward at
    the first backward). The cache is torch's own, in TORCHINDUCTOR_CACHE_DIR (default /tmp/torchinductor_<user>):
    it persists across runs and stages on a machine, and both models' decoder layers share their code when their
    shapes match (Llama-2-7B and DeepSeek-LLM-7B do)."""
    from torch._dynamo.utils import compile_times, counters

    names, values = compile_times(repr="csv", aggregate=True)
    seconds = dict(zip(names, values, strict=True))
    spent = sum(float(seconds.get(phase, 0)) for phase in ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler"))
    inductor = counters["inductor"]
    return {
        "graphs_compiled": inductor["fxgraph_cache_miss"],
        "graphs_from_cache": inductor["fxgraph_cache_hit"],
        "seconds": round(spent, 1),
        # dynamo's phases nest (compile_inner holds the tracing, AOT and inductor ones): their sum is not the total
        "phases_over_1s": {phase: round(float(s), 1) for phase, s in seconds.items() if float(s) >= 1},
    }


# GPUs from this size hold a 7B model's unquantized weights (13 GiB) beside the work: auto merges the adapter into a
# dequantized base for scoring, and dequantizes the base for training, from here.
UNQUANTIZED_FROM_GIB = 40.0


def merge_wanted(execution: ExecutionParams) -> bool:
    """execution.merge_adapter resolved: auto merges on CPUs and on GPUs of at least 40 GiB, counted within
    execution.memory_budget_gib when one is set (the unquantized 7B model and a batch of 64 reviews peaked at 22 GiB
    on the H200)."""
    wanted = execution.merge_adapter
    if wanted != "auto":
        return bool(wanted)
    total = gpu_memory_gib()
    return total is None or min(total, execution.memory_budget_gib or total) >= UNQUANTIZED_FROM_GIB


def dequantized_layer_count(
    base: PreTrainedModel, model: ModelParams, params: Params, max_tokens: int | None = None
) -> int:
    """execution.dequantize_base resolved to a number of decoder layers (the first ones) whose 4-bit projections are
    dequantized for training: true all, false none; auto none on a CPU and, on a GPU, as many as fit
    execution.memory_budget_gib (the GPU's memory when unset) beside training with every layer checkpointed, for
    micro-batches of max_tokens tokens (layers_to_dequantize): all of them on a GPU of 40 GiB or more without a
    budget. Zero without quantization (nothing to dequantize)."""
    layers = decoder_layers(base)
    wanted, total = params.execution.dequantize_base, gpu_memory_gib()
    if not params.quantization.enabled or not layers:
        return 0
    if wanted != "auto":
        return len(layers) if wanted else 0
    if total is None:
        return 0
    quantized = four_bit_modules(layers[0])
    layer_bytes = sum(m.in_features * m.out_features * m.weight.quant_state.dtype.itemsize for m in quantized)
    layer_bytes -= sum(m.weight.data.nbytes for m in quantized)  # the packed 4-bit values it replaces
    fixed, plan = fixed_training_bytes(base, model, params), planned_budget(base, params, max_tokens)
    return layers_to_dequantize(fixed_bytes=fixed, layer_bytes=max(layer_bytes, 1), **plan)


def fixed_training_bytes(base: PreTrainedModel, model: ModelParams, params: Params) -> float:
    """GPU memory a fine-tune of the loaded base holds whatever its batches: what is allocated now, and the LoRA to
    come on models.<key>.lora_targets (fp32 weights, their gradients and AdamW's two moments, 16 bytes each)."""
    targets = set(model.lora_targets)
    adapted = [m for name, m in base.named_modules() if name.rsplit(".", 1)[-1] in targets]
    lora = params.lora.r * sum(m.in_features + m.out_features for m in adapted)
    return torch.cuda.memory_allocated() + 16 * lora


def embeddings_offloaded(
    base: PreTrainedModel, model: ModelParams, params: Params, max_tokens: int | None = None
) -> bool:
    """execution.offload_embeddings resolved: true or false as set; auto on a CUDA GPU (without cuda_graphs) when
    training the loaded base with every layer checkpointed would not fit execution.memory_budget_gib (the GPU's
    memory when unset) with the input embedding table on the GPU (all_checkpointed_room below zero)."""
    wanted = params.execution.offload_embeddings
    if wanted != "auto":
        return bool(wanted)
    if gpu_memory_gib() is None or params.execution.cuda_graphs:
        return False
    plan = planned_budget(base, params, max_tokens)
    return all_checkpointed_room(fixed_bytes=fixed_training_bytes(base, model, params), **plan) < 0


def host_embeddings(
    base: PreTrainedModel, model: ModelParams, params: Params, max_tokens: int | None = None
) -> torch.Tensor | None:
    """execution.offload_embeddings: the loaded base's input embedding table moved to host memory (in the dtype the
    model would compute it in: fp32 under upcast_fp32, as prepare_model_for_kbit_training casts it), for the
    collator; None when it stays on the GPU (embeddings_offloaded)."""
    if not embeddings_offloaded(base, model, params, max_tokens):
        return None
    upcast = params.quantization.enabled and params.execution.upcast_fp32
    return offload_input_embeddings(base, torch.float32 if upcast else None)


def base_for_training(
    base: PreTrainedModel, model: ModelParams, params: Params, max_tokens: int | None = None
) -> PreTrainedModel:
    """The loaded base with as many decoder layers dequantized as dequantized_layer_count says."""
    return dequantize_layers(base, dequantized_layer_count(base, model, params, max_tokens))


def dequantize_layers(base: PreTrainedModel, count: int) -> PreTrainedModel:
    """The 4-bit base with the projections of its first `count` decoder layers dequantized once into their compute
    dtype (transformers' own dequantization): bitsandbytes' 4-bit forward and backward dequantize the weight on every
    call and then take the plain product, so the loss and gradients stay those of the 4-bit base."""
    from transformers.integrations.bitsandbytes import dequantize_and_replace

    layers = decoder_layers(base)
    if count and count == len(layers):
        return dequantized(base, quantized=True)
    for layer in layers[:count]:
        dequantize_and_replace(layer, base.hf_quantizer.quantization_config)
    return base


def four_bit_modules(module: Any) -> list[Any]:
    """The bitsandbytes 4-bit linear layers in a module (PEFT's LoRA wrapper of one shares the class name)."""
    return [m for m in module.modules() if type(m).__name__ == "Linear4bit"]


def projection_weights(layer: Any) -> int:
    """The weights of a decoder layer's projections (in x out, whether held in 4 bits or not; LoRA's left out): the N
    of its FLOPs per token, 2N in a forward pass."""
    projections = [m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in name]
    return sum(m.in_features * m.out_features for m in projections)


def layers_in_4bit(model: Any) -> list[bool]:
    """For each decoder layer, whether its projections are held in 4 bits."""
    return [bool(four_bit_modules(layer)) for layer in decoder_layers(model)]


def base_weights(model: Any) -> str:
    """How the frozen base's projections are held: 4-bit (bitsandbytes), unquantized (dequantized or never
    quantized), or 4-bit in some decoder layers and dequantized in the others (dequantized_layers says how many)."""
    quantized = layers_in_4bit(model)
    return "4-bit" if all(quantized) else "partly dequantized" if any(quantized) else "unquantized"


def dequantized_layers(model: Any, quantized: bool) -> int:
    """How many decoder layers of a 4-bit model (quantized) hold their projections dequantized."""
    return layers_in_4bit(model).count(False) if quantized else 0


def dequantized(base: PreTrainedModel, quantized: bool) -> PreTrainedModel:
    """The 4-bit base as plain linear layers in its compute dtype (transformers' own dequantize), in eval mode."""
    return (base.dequantize() if quantized else base).eval()


def merged_adapter(base: PreTrainedModel, adapter_dir: Path) -> PreTrainedModel:
    """An unquantized base with a saved adapter merged into its weights (PEFT's merge_and_unload)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()


def load_adapter_for_inference(base: PreTrainedModel, adapter_dir: Path) -> Any:
    """The base with a saved adapter, its weights cast to the base's compute dtype: PEFT keeps them in fp32, which
    would cast every activation to fp32 in each of the seven adapted projections."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, adapter_dir)
    dtype = base.get_input_embeddings().weight.dtype
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(dtype)
    return model.eval()
