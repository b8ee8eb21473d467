"""Resolve, build and load the models: hub checkpoints pinned to a commit, or seeded random weights from the real
config; 4-bit NF4 loading through bitsandbytes; LoRA through PEFT."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from duel import attention
from duel.io import atomic_dir, read_json, write_json
from duel.params import ModelParams, Params, ParamsError, QuantizationParams

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
VERSIONED = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "dvclive", "flash-attn"]
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
attention.register()  # train.attention: varlen


class ModelError(ValueError):
    """A model that cannot be resolved or loaded; the message names it and the fix."""


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["cuda"] = torch.version.cuda
    found["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return found


def _hub_call(key: str, model: ModelParams, fn: Any, **kwargs: Any) -> Any:
    """Call a hub-backed loader and turn its many failure types into one line naming the model and the fix."""
    try:
        return fn(model.checkpoint, revision=model.revision, trust_remote_code=model.trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        if Path(model.checkpoint).exists():
            raise ModelError(f"models.{key}.checkpoint: cannot load {model.checkpoint} ({err})") from None
        raise


def _check_on_hub(key: str, model: ModelParams) -> None:
    """Fetch the checkpoint's config.json (from the cache when offline) through the hub client, whose errors say
    what is wrong; transformers' loaders re-raise them as generic errors, or, for tokenizers, go on without files."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = f"models.{key}.checkpoint: {model.checkpoint!r}"
    try:
        hf_hub_download(model.checkpoint, "config.json", revision=model.revision)
    except GatedRepoError:  # a subclass of RepositoryNotFoundError: first
        raise ModelError(f"{name} is gated; accept its licence on the hub and export HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{name} does not exist on the hub (or is private: export HF_TOKEN); check the id") from None
    except RevisionNotFoundError:
        raise ModelError(
            f"models.{key}.revision: {model.revision!r} is not a branch, tag or commit of {model.checkpoint}"
        ) from None
    except LocalEntryNotFoundError as err:
        raise ModelError(
            f"{name} is not reachable on the hub and not in the cache ({type(err.__cause__ or err).__name__}); to run "
            "offline set HF_HUB_OFFLINE=1 and HF_HUB_CACHE to a cache that holds it, or use a local folder"
        ) from None
    except ValueError as err:  # an id that is not of the form org/name
        raise ModelError(f"{name} is not a hub id nor a local folder ({str(err).splitlines()[0]})") from None


def resolve_model(key: str, model: ModelParams, seed: int, out_dir: Path) -> dict[str, Any]:
    """Write models/base/<key>/: tokenizer, config and model.json; the weights too when init is random.

    Pretrained weights stay in the Hugging Face cache (13 GB does not belong in the DVC cache): model.json pins the
    resolved commit so later stages load exactly those files, offline.
    """
    # The checkpoint's tokenizer.json as it is: transformers 5's AutoTokenizer maps DeepSeek-LLM's
    # "LlamaTokenizerFast" class onto Llama's Metaspace pre-tokenizer, which drops every space of its byte-level BPE
    # ("Hello world" -> "H", "ellow", "orld"). Loading the file directly keeps Llama-2's tokens unchanged too.
    if not Path(model.checkpoint).is_dir():
        _check_on_hub(key, model)
    tokenizer = _hub_call(key, model, PreTrainedTokenizerFast.from_pretrained)
    config = _hub_call(key, model, AutoConfig.from_pretrained)
    with atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        if model.init == "random":
            for field, value in model.overrides.items():
                if not hasattr(config, field):
                    raise ModelError(f"models.{key}.overrides.{field}: not a field of {type(config).__name__}")
                setattr(config, field, value)
            built = _random_model(config, seed)
            built.save_pretrained(tmp, safe_serialization=True)
            info = {
                "source": "random",
                "path": str(out_dir),
                "revision": None,
                "seed": seed,
                "num_parameters": built.num_parameters(),
            }
        else:
            from huggingface_hub import snapshot_download

            if Path(model.checkpoint).is_dir():
                path, commit = str(Path(model.checkpoint).resolve()), None
            else:
                path = _hub_call(key, model, _snapshot, snapshot_download=snapshot_download)
                commit = Path(path).name
            config.save_pretrained(tmp)
            info = {"source": "pretrained", "path": path, "revision": commit, "seed": None, "num_parameters": None}
        info |= {
            "key": key,
            "checkpoint": model.checkpoint,
            "requested_revision": model.revision,
            "architecture": config.architectures,
            "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size,
            "max_position_embeddings": config.max_position_embeddings,
        }
        write_json(tmp / "model.json", info)
    return info


def _random_model(config: Any, seed: int) -> PreTrainedModel:
    """Seeded random bf16 weights, built on the GPU where they fit (initialising 7B weights on a CPU takes minutes;
    in bf16 they take 13.5 GB, more than some GPUs have), else on the CPU. The seed fixes the weights for a given
    device kind; a GPU build and a CPU build differ."""
    if torch.cuda.is_available():
        torch.manual_seed(seed)
        try:
            with torch.device("cuda"):
                return AutoModelForCausalLM.from_config(config, dtype=DTYPES["bfloat16"])
        except torch.OutOfMemoryError:
            print("download: the random weights do not fit on the GPU; building them on the CPU (slower)")
    torch.manual_seed(seed)
    with torch.device("cpu"):
        return AutoModelForCausalLM.from_config(config, dtype=DTYPES["bfloat16"])


def _snapshot(repo_id: str, revision: str, trust_remote_code: bool, snapshot_download: Any) -> str:
    # Only safetensors weights are fetched: pickled .bin files can run code when loaded.
    return snapshot_download(repo_id, revision=revision, allow_patterns=WEIGHT_PATTERNS)


def model_info(base_dir: Path) -> dict[str, Any]:
    return read_json(base_dir / "model.json")


def load_tokenizer(base_dir: Path) -> Any:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base_dir)  # tokenizer.json as saved (see resolve_model)
    if tokenizer.pad_token_id is None:  # Llama-2 has none; pad positions are masked, so any id works
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention_implementation(requested: str, packed: bool) -> str:
    """train.attention resolved for training on packed rows (packed true) or for batches of left-padded reviews (the
    paper's padding, and scoring). auto: flash_attention_2 where flash-attn is installed; else, for packed rows on
    CUDA, varlen (PyTorch's own variable-length Flash Attention, duel.attention); else sdpa. varlen asked for
    padded batches gives sdpa."""
    if requested == attention.VARLEN and not attention.varlen_available():
        raise ParamsError(
            "train.attention: varlen needs an Ampere or newer CUDA GPU and PyTorch 2.9 or newer "
            "(torch.nn.attention.varlen); set auto or sdpa"
        )
    if requested == "auto":
        if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
            return "flash_attention_2"
        requested = attention.VARLEN if packed and attention.varlen_available() else "sdpa"
    return "sdpa" if requested == attention.VARLEN and not packed else requested


def quantization_config(params: QuantizationParams) -> BitsAndBytesConfig | None:
    if not params.enabled:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=params.quant_type,
        bnb_4bit_use_double_quant=params.double_quant,
        bnb_4bit_compute_dtype=DTYPES[params.compute_dtype],
    )


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
    """train.kernels resolved: auto is liger on a CUDA machine where liger-kernel is installed, else none. For
    compiled layers (train.compile) auto is none: inductor fuses those operations itself, and dynamo (torch 2.11)
    fails on Liger's RMSNorm function, so liger with compile is an error."""
    installed = all(importlib.util.find_spec(name) is not None for name in ("liger_kernel", "triton"))
    if requested == "liger" and not installed:
        raise ParamsError(
            "train.kernels: liger needs the liger-kernel and triton packages (pip install -r requirements-gpu.txt); "
            "or set it to auto or none"
        )
    if requested == "liger" and compiled:
        raise ParamsError(
            "train.kernels: liger cannot be compiled (dynamo fails on Liger's RMSNorm); with train.compile: true "
            "set it to auto or none (inductor fuses those operations itself)"
        )
    if requested == "auto":
        return "liger" if installed and torch.cuda.is_available() and not compiled else "none"
    return requested


def load_base_model(
    base_dir: Path, model: ModelParams, params: Params, attention: str, kernels: str = "none"
) -> PreTrainedModel:
    """The base model, 4-bit when quantization is on, on the GPU when there is one, with the fused kernels asked
    for (kernels_implementation); no adapter yet."""
    info = model_info(base_dir)
    device_map = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    loaded = AutoModelForCausalLM.from_pretrained(
        info["path"],  # a local folder: the random checkpoint, or the pinned hub snapshot
        dtype=DTYPES[params.quantization.compute_dtype],
        quantization_config=quantization_config(params.quantization),
        attn_implementation=attention,
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

    if params.quantization.enabled and params.quantization.upcast_fp32:
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
    set_checkpointed_layers(adapted, checkpointed_layer_count(adapted, params, max_tokens))
    return adapted


def compile_layers(model: Any, wanted: bool) -> None:
    """train.compile: torch.compile each decoder layer in place (regional compilation: one layer's code is compiled
    once and serves all of them; dynamic shapes, so rows of new lengths do not recompile). Checkpointing stays
    outside the compiled code, so the OOM back-off can still switch it on."""
    if wanted:
        for layer in decoder_layers(model):
            layer.compile(dynamic=True)


def gpu_memory_gib() -> float | None:
    """The GPU's memory in GiB (the process's first CUDA device), or None on a machine without one."""
    return torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None


def decoder_layers(model: Any) -> list[Any]:
    """The model's decoder layers, the units transformers checkpoints."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_checkpointed_layers(model: Any, count: int) -> None:
    """Gradient checkpointing (non-reentrant) on the first `count` decoder layers and off on the others."""
    if count and not model.is_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for i, layer in enumerate(decoder_layers(model)):
        layer.gradient_checkpointing = i < count


def checkpointed_layers(model: Any) -> int:
    """How many decoder layers have gradient checkpointing on."""
    return sum(layer.gradient_checkpointing for layer in decoder_layers(model))


def switch_on_checkpointing(model: Any) -> bool:
    """Turn gradient checkpointing on in every decoder layer of a model being trained; False if it was already."""
    layers = len(decoder_layers(model))
    if checkpointed_layers(model) == layers:
        return False
    set_checkpointed_layers(model, layers)
    return True


# Activations one decoder layer keeps for the backward pass when it is not recomputed, per token, in bytes. Measured
# on the H200 (benchmarks: sweep of checkpointed layers, both 7B models, micro-batch 16 packed, bf16, LoRA on all
# seven projections with dropout): 0.23 MiB per token and layer, which is 2 bytes x (5 x intermediate + 16 x hidden)
# for their shapes.
def kept_layer_bytes(hidden: int, intermediate: int) -> int:
    return 2 * (5 * intermediate + 16 * hidden)


BUDGET_SHARE = 0.85  # of the memory budget planned for; the rest is the allocator's slack (fragmentation)


def layers_to_checkpoint(
    budget_bytes: float, fixed_bytes: float, layers: int, hidden: int, intermediate: int, max_tokens: int
) -> int:
    """The fewest decoder layers to recompute so that training fits the budget: a checkpointed layer keeps only its
    input (max_tokens x hidden values in bf16), another keeps all its activations (kept_layer_bytes per token), and
    the backward pass recomputes one checkpointed layer at a time. fixed_bytes: weights, LoRA, gradients, optimizer.
    """
    kept, saved = kept_layer_bytes(hidden, intermediate) * max_tokens, 2 * hidden * max_tokens
    room = BUDGET_SHARE * budget_bytes - fixed_bytes - layers * saved - kept
    return layers - min(layers, max(0, int(room // (kept - saved))))


def checkpointed_layer_count(model: Any, params: Params, max_tokens: int | None) -> int:
    """train.gradient_checkpointing resolved to a number of decoder layers: true all, false none; auto all on a CPU
    and, on a GPU, the fewest that fit train.memory_budget_gib (the GPU's memory when unset) for micro-batches of
    max_tokens tokens (micro_batch x max_length when not given; layers_to_checkpoint): none on the H200 without a
    budget. With varlen attention, checkpointing all but 4 layers ran 1.13-1.16x faster than all in the H200 sweep
    (with SDPA's masked attention it had run slower, 0.81-0.86x). An out-of-memory error later switches all on."""
    layers = len(decoder_layers(model))
    wanted = params.train.gradient_checkpointing
    if wanted != "auto":
        return layers if wanted else 0
    total = gpu_memory_gib()
    if total is None:
        return layers
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fixed = torch.cuda.memory_allocated() + 12 * trainable  # fp32 gradient and AdamW's two moments per LoRA weight
    tokens = max_tokens or params.train.micro_batch * params.data.max_length
    budget = (params.train.memory_budget_gib or total) * 2**30
    config = model.config
    return layers_to_checkpoint(budget, fixed, layers, config.hidden_size, config.intermediate_size, tokens)


MERGE_FROM_GIB = 40.0


def merge_wanted(params: Params) -> bool:
    """eval.merge_adapter resolved: auto merges on CPUs and on GPUs of at least 40 GiB (the unquantized 7B model
    and a batch of 64 reviews peaked at 22 GiB on the H200)."""
    wanted = params.eval.merge_adapter
    if wanted != "auto":
        return bool(wanted)
    total = gpu_memory_gib()
    return total is None or total >= MERGE_FROM_GIB


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
