"""Models resolved so that no later stage touches the network: hub checkpoints pinned to a commit (the weights stay
in the Hugging Face cache), or seeded random weights built from the real config; the tokenizer as the checkpoint
ships it."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoConfig, PreTrainedTokenizerFast

from duel.errors import ModelError
from duel.io import atomic_dir, read_json, write_json
from duel.params import ModelParams

if TYPE_CHECKING:
    from transformers import PreTrainedModel

VERSIONED = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "dvclive", "flash-attn"]
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]


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
            raise ModelError(
                f"models.{key}.checkpoint: cannot load {model.checkpoint} ({(str(err).splitlines() or [''])[0]}); "
                "point it at a Hugging Face model folder or a hub id"
            ) from None
        raise


def _check_local_folder(key: str, model: ModelParams) -> None:
    """A local checkpoint must be a Hugging Face model folder: config.json, the tokenizer.json the stages load as it
    is, and for pretrained weights safetensors (pickled .bin files are never loaded: they can run code)."""
    folder, name = Path(model.checkpoint), f"models.{key}.checkpoint: {model.checkpoint}"
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"{name} has no config.json, so it is no Hugging Face model folder; point it at the folder that holds "
            "config.json, tokenizer.json and the weights, or at a hub id"
        )
    if not (folder / "tokenizer.json").is_file():
        raise ModelError(
            f"{name} has no tokenizer.json (the fast tokenizer file the stages load); save the model's tokenizer "
            "there with tokenizer.save_pretrained"
        )
    if model.init == "pretrained" and not any(folder.glob("*.safetensors")):
        raise ModelError(
            f"{name} holds no *.safetensors weights (pickled .bin files are never loaded: they can run code); "
            f"save them with save_pretrained(safe_serialization=True), or set models.{key}.init: random"
        )


def _check_causal_lm(key: str, model: ModelParams, config: Any) -> None:
    """The duel trains and scores next-token logits: the checkpoint must be a causal (decoder-only) language model.
    Code shipped with a checkpoint (trust_remote_code) registers its own classes, which this cannot know."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not model.trust_remote_code:
        raise ModelError(
            f"models.{key}.checkpoint: {model.checkpoint} is a {config.model_type} model ({type(config).__name__}), "
            "not a causal language model; the duel fine-tunes decoder-only models such as meta-llama/Llama-2-7b-hf"
        )


# The sizes models.<key>.overrides shrink the architecture by: each must stay a whole number above zero.
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)


def apply_overrides(key: str, config: Any, overrides: dict[str, int | float]) -> None:
    """Set models.<key>.overrides on the config, refusing, with the key named, what makes no sense for the
    architecture: a field it does not have, a size that is not a positive whole number, or attention heads that do
    not split the width (query heads must divide hidden_size, key/value heads must divide the query heads)."""
    from huggingface_hub.errors import StrictDataclassError

    prefix = f"models.{key}.overrides"
    for field, value in overrides.items():
        if not hasattr(config, field):
            raise ModelError(
                f"{prefix}.{field}: not a field of {type(config).__name__}; check the spelling (its sizes: "
                f"{', '.join(name for name in SIZE_FIELDS if hasattr(config, name))})"
            )
        if field in SIZE_FIELDS and (isinstance(value, float) or value <= 0):
            raise ModelError(f"{prefix}.{field}: {value} must be a whole number > 0")
        try:
            setattr(config, field, value)
        except StrictDataclassError as err:  # transformers' own check of the field's type
            raise ModelError(f"{prefix}.{field}: {str(err).splitlines()[-1].strip()}") from None
    heads = config.num_attention_heads
    if {"hidden_size", "num_attention_heads"} & overrides.keys() and config.hidden_size % heads:
        field = "num_attention_heads" if "num_attention_heads" in overrides else "hidden_size"
        raise ModelError(
            f"{prefix}.{field}: num_attention_heads {heads} does not divide hidden_size {config.hidden_size}; pick "
            "sizes where it does (e.g. hidden_size 64, num_attention_heads 4)"
        )
    if {"num_attention_heads", "num_key_value_heads"} & overrides.keys() and heads % config.num_key_value_heads:
        field = "num_key_value_heads" if "num_key_value_heads" in overrides else "num_attention_heads"
        raise ModelError(
            f"{prefix}.{field}: num_key_value_heads {config.num_key_value_heads} does not divide "
            f"num_attention_heads {heads} (each key/value head serves an equal group of query heads); pick a divisor"
        )
    try:
        config.validate()  # the architecture's own checks, where transformers defines them
    except StrictDataclassError as err:
        raise ModelError(f"{prefix}: {str(err).splitlines()[-1].strip()}") from None


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
    # Everything that can be wrong with the checkpoint is checked before a weight is built or fetched.
    if Path(model.checkpoint).is_dir():
        _check_local_folder(key, model)
    else:
        _check_on_hub(key, model)
    config = _hub_call(key, model, AutoConfig.from_pretrained)
    _check_causal_lm(key, model, config)
    if model.init == "random":
        apply_overrides(key, config, model.overrides)
    tokenizer = _hub_call(key, model, PreTrainedTokenizerFast.from_pretrained, **mistral_regex(config))
    with atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        if model.init == "random":
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
                if not any(Path(path).glob("*.safetensors")):
                    raise ModelError(
                        f"models.{key}.checkpoint: {model.checkpoint} has no safetensors weights at {commit} (pickled "
                        ".bin files are never loaded: they can run code); pick a revision or a copy that has them"
                    )
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


# The model types whose tokenizers transformers' fix_mistral_regex is for (its own list).
MISTRAL_TYPES = {"mistral", "mistral3", "voxtral", "ministral", "pixtral"}


def mistral_regex(config: Any) -> dict[str, bool]:
    """The tokenizer's fix_mistral_regex: False for any model but Mistral's. transformers 5 warns that a tokenizer
    "with an incorrect regex pattern" will tokenize wrongly whenever the local config.json names no transformers
    version, as an offline copy of the hub may not (DeepSeek-LLM's, a llama model, in the demo); the fix it suggests
    is for Mistral's pre-tokenizer only. Stated, the warning goes and the tokens stay the same."""
    return {} if config.model_type in MISTRAL_TYPES else {"fix_mistral_regex": False}


def _random_model(config: Any, seed: int) -> PreTrainedModel:
    """Seeded random bf16 weights, built on the GPU where they fit (initialising 7B weights on a CPU takes minutes;
    in bf16 they take 13.5 GB, more than some GPUs have), else on the CPU. The seed fixes the weights for a given
    device kind; a GPU build and a CPU build differ."""
    from transformers import AutoModelForCausalLM  # the model classes: seconds of imports the tokenizer never needs

    if torch.cuda.is_available():
        torch.manual_seed(seed)
        try:
            with torch.device("cuda"):
                return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        except torch.OutOfMemoryError:
            print("base: the random weights do not fit on the GPU; building them on the CPU (slower)")
    torch.manual_seed(seed)
    with torch.device("cpu"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


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
