"""Typed, frozen view of params.yaml. Loaded once per stage; an unknown key, a wrong type or a contradiction raises
ParamsError naming the key and the fix."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from duel.errors import ParamsError


@dataclass(frozen=True)
class SeedParams:
    """One seed per source of chance, so that a seed study can say which one moved the result."""

    data: int
    """Which reviews are drawn into the train and test subsets (stage download)."""
    train: int
    """The training run: the LoRA initialisation, the order of the training reviews and the dropout masks."""
    weights: int
    """The weights of a model with init: random (the demo, the fit check); unused for pretrained checkpoints."""

    def __post_init__(self) -> None:
        for key in ("data", "train", "weights"):
            value = getattr(self, key)
            if not 0 <= value < 2**32:
                raise ParamsError(
                    f"seeds.{key}: {value} is outside [0, 2**32 - 1], the range numpy and torch seed from"
                )


@dataclass(frozen=True)
class DataParams:
    source: str
    """Hub data set id (stanfordnlp/imdb), URL of aclImdb_v1.tar.gz, or a local folder (parquet files or aclImdb)."""
    source_sha256: str | None
    """Expected SHA-256 of a URL source; null skips the check (the checksum is recorded either way)."""
    train_size: int
    """Training reviews drawn, stratified by label (paper: 200 steps x 16 = 3,200)."""
    test_size: int
    """Test reviews drawn, stratified by label (25,000 = the whole IMDB test split)."""
    max_length: int
    """Tokens per example, prompt and answer included; longer reviews are cut at the end."""
    prompt: str
    """Prompt template; {review} is replaced by the review text. The answer token follows it."""
    label_words: list[str]
    """Verbalizer: label_words[label] is the answer; each must be a single token for every model."""

    def __post_init__(self) -> None:
        _positive("data.train_size", self.train_size)
        _positive("data.test_size", self.test_size)
        _positive("data.max_length", self.max_length)
        if "{review}" not in self.prompt:
            raise ParamsError("data.prompt: must contain '{review}' where the review text goes")
        if len(self.label_words) != 2 or len(set(self.label_words)) != 2:
            raise ParamsError("data.label_words: give two different words, [negative_word, positive_word]")


@dataclass(frozen=True)
class ModelParams:
    checkpoint: str
    """Hub id (meta-llama/Llama-2-7b-hf) or local folder of a Hugging Face checkpoint."""
    revision: str
    """Branch, tag or commit of the hub checkpoint; the resolved commit is recorded."""
    init: Literal["pretrained", "random"]
    """pretrained: the checkpoint's weights; random: its architecture with seeded random weights (no download)."""
    overrides: dict[str, int | float]
    """Config fields replaced before building a random model (e.g. num_hidden_layers: 2 for a tiny demo)."""
    lora_targets: list[str]
    """Module names LoRA adapts (the seven projections of a Llama block)."""
    trust_remote_code: bool
    """Run code shipped with the checkpoint; off unless you trust its author."""

    def __post_init__(self) -> None:
        if self.overrides and self.init != "random":
            raise ParamsError("models.*.overrides: only allowed with init: random (pretrained weights fix the shape)")
        if not self.lora_targets:
            raise ParamsError("models.*.lora_targets: name at least one module, e.g. [q_proj, v_proj]")


@dataclass(frozen=True)
class QuantizationParams:
    enabled: bool
    """Load the base weights in 4 bits through bitsandbytes (QLoRA)."""
    quant_type: Literal["nf4", "fp4"]
    double_quant: bool
    """Quantize the quantization constants too (about 0.4 bits per weight saved)."""


@dataclass(frozen=True)
class LoraParams:
    r: int
    alpha: int
    dropout: float

    def __post_init__(self) -> None:
        _positive("lora.r", self.r)
        _positive("lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ParamsError(f"lora.dropout: {self.dropout} is outside [0, 1); use e.g. 0.05")


@dataclass(frozen=True)
class TrainParams:
    """What is learned: the paper's optimisation (with quantization and lora, the experiment itself)."""

    steps: int
    """Optimizer steps (paper: 200)."""
    batch_size: int
    """Reviews per optimizer step (paper: 16). What is learned depends on this, not on execution.micro_batch."""
    learning_rate: float
    lr_scheduler: Literal["linear", "constant", "cosine"]
    warmup_steps: int
    optimizer: Literal["adamw_torch_fused", "adamw_torch", "paged_adamw_8bit"]
    """adamw_torch_fused (paper) and adamw_torch compute the same update; paged_adamw_8bit is another optimizer."""

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size"):
            _positive(f"train.{key}", getattr(self, key))
        if self.learning_rate <= 0:
            raise ParamsError(f"train.learning_rate: {self.learning_rate} must be > 0; the paper uses 2e-5")
        if self.warmup_steps < 0:
            raise ParamsError(f"train.warmup_steps: {self.warmup_steps} must be >= 0")


@dataclass(frozen=True)
class ExecutionParams:
    """How the work is executed: none of these changes what is learned beyond rounding (tests check the loss and
    gradients of each path against the plain one); profiles/paper.yaml sets the paper's literal recipe here."""

    micro_batch: int
    """Reviews per forward pass of each process; train.batch_size / (micro_batch x processes) passes are accumulated
    (paper: 1 x 16)."""
    data_parallel: int | Literal["auto"]
    """Processes training one fine-tune together, each on its own GPU (torchrun with DistributedDataParallel under
    the Trainer; gloo between CPU processes): each takes micro_batch reviews per pass of every step's
    train.batch_size, and the gradients are summed over all, so what is learned does not change. auto: all visible
    CUDA GPUs that split a step evenly (1 on a CPU; 1 at micro_batch 16 of 16 reviews, 2 GPUs at micro_batch 8).
    Above 1, the stage re-launches itself under torchrun; under a torchrun started by hand (several machines),
    torchrun's world size rules."""
    precision: Literal["bf16", "fp16", "fp32"]
    """Mixed precision of the trainable part (paper: fp16)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"]
    """dtype of the matrix products over the 4-bit weights, and of the unquantized weights (paper: float16)."""
    upcast_fp32: bool
    """Cast the weights that stay unquantized (norms, embeddings, head) to fp32, as PEFT's
    prepare_model_for_kbit_training does (the paper's stack); off keeps them in compute_dtype (faster)."""
    padding: Literal["packed", "flattened", "longest", "max_length"]
    """packed: lay a micro-batch's reviews end to end in rows of about pack_tokens tokens, each review attending to
    itself only (rows padded to the longest, a few percent); flattened: all of a micro-batch's reviews in one row
    with no padding at all, through transformers' own padding-free collator (DataCollatorWithFlattening); longest:
    pad each micro-batch to its longest review; max_length: pad every review to data.max_length (paper)."""
    pack_tokens: int
    """Target row length for padding: packed: a micro-batch's reviews go into ceil(tokens / pack_tokens) rows of
    about equal length (at least data.max_length)."""
    attention: Literal["auto", "flash_attention_2", "varlen", "flex_attention", "sdpa", "eager"]
    """auto: flash_attention_2 when installed; else, for packed rows on an Ampere or newer CUDA GPU, varlen (PyTorch's
    own variable-length Flash Attention: each packed review's causal block only, no mask); else sdpa. flex_attention:
    transformers' FlexAttention on its packed-sequence block mask (training on CUDA only: it has no backward pass on
    the CPU). Scoring (left-padded batches) uses sdpa where training uses varlen or flex_attention. The one used is
    recorded."""
    kernels: Literal["auto", "liger", "none"]
    """Fused Triton kernels for RMSNorm, RoPE and SwiGLU through transformers' Liger integration (training and
    scoring). auto: liger on a CUDA machine with liger-kernel installed (requirements-gpu.txt), else none."""
    compile: bool
    """torch.compile each decoder layer for training (regional compilation, dynamic shapes): inductor fuses the
    elementwise work and the step launches fewer kernels from less Python, for a one-off compile at the start of the
    run (benchmarks/README.md: what it paid on the H200). kernels auto is then none (inductor fuses RMSNorm, RoPE
    and SwiGLU itself); liger cannot be compiled. The compiled code is kept in torch's own cache
    (TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_<user>), so later runs on the machine, and the other
    model's stage where the layer shapes match, start warm; training.json records how many graphs came from it."""
    fuse_projections: bool
    """Compute each decoder layer's LoRA projections that read the same input together (duel/fused.py): q/k/v in
    one group, gate/up in another, each a single dropout kernel (a mask per projection, as PEFT draws them), one
    batched product per LoRA factor and, over unquantized base weights, one base product; the layer launches about
    half the kernels for its seven adapted projections. The adapter and what is learned are PEFT's; no compile
    (inductor fuses the layer itself)."""
    cuda_graphs: bool
    """Capture each micro-batch's forward pass, loss and backward pass as a CUDA graph, once per row length, and replay
    it (duel/graphs.py): the host launches one graph instead of thousands of kernels, so the GPU stops waiting on it.
    Needs a CUDA GPU, one process, padding flattened and no compile; each row is padded up to the next multiple of
    graph_tokens (a padding sequence of its own, so what is learned does not change)."""
    graph_tokens: int
    """cuda_graphs: a micro-batch's flattened row is padded up to the next multiple of this many tokens, so a run
    meets few lengths, each captured once (at most data.max_length: the padding is one sequence)."""
    gradient_checkpointing: bool | Literal["auto"]
    """Recompute activations in the backward pass (less memory, about a third more compute). auto: on a GPU, in the
    fewest decoder layers that let the run's largest micro-batch fit memory_budget_gib (else the GPU's memory), by a
    per-layer memory model measured on the H200 (none on the H200 without a budget, 26-28 of 30-32 at 16 GiB); on a
    CPU, in all. Either way an out-of-memory error switches it on in all layers, then offloads their inputs (unless
    offload_checkpoints is false), before the micro-batch is halved."""
    offload_checkpoints: bool | Literal["auto"]
    """Checkpointed layers keep their input in host memory until the backward pass (pinned; copied back to recompute
    the layer): the checkpoints' memory, 2 bytes x hidden per token and layer, leaves the GPU for a copy each way.
    auto: when even checkpointing every layer would not fit memory_budget_gib, in the fewest layers that let it fit
    (checkpointed_layer_count); true: in every checkpointed layer."""
    offload_embeddings: bool | Literal["auto"]
    """The frozen input embedding table (0.78 GiB for DeepSeek's 102,400 words, 0.24 for Llama-2's 32,000) stays in
    host memory: the collator looks each micro-batch's tokens up there and the model takes inputs_embeds, the same
    values copied over (hidden x 2 bytes a token, 49 MB for 6,000 tokens). auto: on a GPU when even checkpointing
    every layer would not fit memory_budget_gib with the table on the GPU (before offload_checkpoints, which copies
    a layer's input each way for every layer). Not with cuda_graphs (their captured inputs are token ids)."""
    dequantize_base: bool | Literal["auto"]
    """Train against the frozen 4-bit base dequantized once, at the start, into compute_dtype: the same NF4 values
    in the same matrix products, without a dequantize kernel in every projection's forward and backward pass (fewer
    kernels for the host to launch), for the unquantized weights' memory (13 GiB for a 7B model instead of 4).
    auto: on a CUDA GPU, in as many decoder layers as fit memory_budget_gib (the GPU's memory when unset) beside
    training with every layer checkpointed, before any layer goes unchecked (gradient_checkpointing auto): all of them
    on a GPU of 40 GiB or more without a budget; on a CPU, none."""
    memory_budget_gib: float | None
    """The GPU memory training and scoring may use, as NVML counts it (nvml_peak_gib, nvidia-smi; null: the whole
    GPU): the memory of the card the run stands for. Torch's allocator is capped at the budget less the memory outside
    it (the CUDA context and loaded kernels, 1.2-1.35 GiB on an H100 or H200), measured at the start and again after
    the first optimizer step or scoring batch; merge_adapter auto merges only within a budget of 40 GiB or more."""
    expandable_segments: bool
    """Training: torch's CUDA allocator grows its memory segments in place (PYTORCH_CUDA_ALLOC_CONF
    expandable_segments:True) instead of caching blocks of each size the micro-batches of varying length ask for;
    the same speed in less reserved memory (on an H100, Llama-2: 49 GiB instead of 71 without a budget, 11.5 instead
    of 16.0 at a 16 GiB budget). A PYTORCH_CUDA_ALLOC_CONF set in the environment takes precedence."""
    logging_steps: int
    """Log the loss every N optimizer steps (paper: 10)."""
    save_steps: int
    """Checkpoint every N steps so a crashed run resumes (0: never)."""
    eval_batch_size: int
    """Test reviews per forward pass when scoring (sorted by length, so padding stays small)."""
    eval_padding: Literal["left", "flattened"]
    """How scoring lays out a batch's reviews. left: one row per review, left-padded to the batch's longest, under an
    attention mask (sdpa: the masked kernels). flattened: all of them in one row with no padding, each attending to
    itself only (transformers' padding-free layout: position ids restart per review, and varlen or Flash Attention 2
    take the reviews' boundaries; sdpa, on a CPU, a block mask of the row's width squared, which is slow), and the
    logits computed at each review's last position only. The same logits either way, to rounding."""
    merge_adapter: bool | Literal["auto"]
    """Score a copy of the base in compute_dtype (dequantized from 4 bits) with the adapter merged into it: the
    weights training saw, without per-batch dequantization or the adapter's side path (faster; needs the unquantized
    model's memory: 22 GiB peak for 7B at batch 64 on the H200). false: the 4-bit base with the adapter beside it.
    auto: merge on CPUs and on GPUs of at least 40 GiB (within memory_budget_gib when set). The zero-shot scoring of
    a base model follows the same choice (the dequantized or the 4-bit base)."""

    def __post_init__(self) -> None:
        for key in ("micro_batch", "pack_tokens", "graph_tokens", "logging_steps", "eval_batch_size"):
            _positive(f"execution.{key}", getattr(self, key))
        if self.data_parallel != "auto":
            _positive("execution.data_parallel", self.data_parallel)
        if self.save_steps < 0:
            raise ParamsError(f"execution.save_steps: {self.save_steps} must be >= 0 (0: never)")
        if self.memory_budget_gib is not None and self.memory_budget_gib <= 0:
            raise ParamsError(f"execution.memory_budget_gib: {self.memory_budget_gib} must be > 0, or null")
        if self.cuda_graphs and (self.padding != "flattened" or self.compile):
            raise ParamsError(
                "execution.cuda_graphs: needs execution.padding: flattened (one row of few lengths per micro-batch) "
                "and execution.compile: false; set those, or cuda_graphs: false"
            )
        if self.offload_embeddings is True and self.cuda_graphs:
            raise ParamsError(
                "execution.offload_embeddings: true cannot be captured by execution.cuda_graphs (they replay token "
                "ids); set offload_embeddings: auto or false, or cuda_graphs: false"
            )
        if self.fuse_projections and self.compile:
            raise ParamsError(
                "execution.fuse_projections: cannot be compiled (inductor fuses the layer itself); "
                "set fuse_projections: false or compile: false"
            )
        if self.precision == "fp16" and self.compute_dtype == "bfloat16":
            raise ParamsError(
                "execution.precision: fp16 with execution.compute_dtype bfloat16 mixes two half types; "
                "set execution.compute_dtype: float16 (paper) or execution.precision: bf16"
            )


@dataclass(frozen=True)
class Params:
    seeds: SeedParams
    data: DataParams
    models: dict[str, ModelParams]
    quantization: QuantizationParams
    lora: LoraParams
    train: TrainParams
    execution: ExecutionParams

    def __post_init__(self) -> None:
        if not self.models:
            raise ParamsError("models: define at least one model section (e.g. llama)")
        if self.train.batch_size % self.execution.micro_batch:
            raise ParamsError(
                f"execution.micro_batch: {self.execution.micro_batch} does not divide train.batch_size "
                f"{self.train.batch_size}; use a divisor so the effective batch stays the same"
            )
        if self.execution.data_parallel != "auto":
            check_step_split(self.train.batch_size, self.execution.micro_batch, self.execution.data_parallel)
        if self.execution.cuda_graphs and self.execution.graph_tokens > self.data.max_length:
            raise ParamsError(
                f"execution.graph_tokens: {self.execution.graph_tokens} is longer than data.max_length "
                f"{self.data.max_length}; the padding is one sequence, so lower it (e.g. 256)"
            )
        if self.execution.padding == "packed" and self.execution.pack_tokens < self.data.max_length:
            raise ParamsError(
                f"execution.pack_tokens: {self.execution.pack_tokens} is shorter than data.max_length "
                f"{self.data.max_length}; a row must hold the longest review, so raise it"
            )

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step: 16 reviews / micro-batch 1 = 16 passes (paper)."""
        return self.train.batch_size // self.execution.micro_batch

    def model(self, key: str) -> ModelParams:
        if key not in self.models:
            raise ParamsError(f"models.{key}: no such model in params.yaml; known: {', '.join(self.models)}")
        return self.models[key]


def check_step_split(batch_size: int, micro_batch: int, processes: int, source: str = "data_parallel") -> None:
    """A step's reviews must split evenly into micro-batches of every process: the same train.batch_size reviews
    per step whatever the number of processes."""
    if batch_size % (micro_batch * processes):
        fits = [d for d in range(1, micro_batch + 1) if batch_size % (d * processes) == 0]
        fix = f"set execution.micro_batch: {fits[-1]}, or" if fits else "use"
        raise ParamsError(
            f"execution.micro_batch: {micro_batch} reviews x {processes} processes (execution.{source}) does not "
            f"divide train.batch_size {batch_size}; {fix} fewer processes"
        )


def _positive(key: str, value: int | float) -> None:
    if value <= 0:
        raise ParamsError(f"{key}: {value} must be > 0")


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Return value checked against a type hint (ints are accepted where floats are expected)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            choices = ", ".join(str(a) for a in typing.get_args(hint))
            raise ParamsError(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(hint):
            try:
                return _check_type(key, value, arm)
            except ParamsError as err:
                errors.append(str(err))
        raise ParamsError(errors[-1] if len(errors) == 1 else f"{key}: {value!r} has the wrong type ({hint})")
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping, got {value!r}")
        _, item = typing.get_args(hint)
        return {k: _check_type(f"{key}.{k}", v, item) for k, v in value.items()}
    if hint is type(None):
        if value is not None:
            raise ParamsError(f"{key}: expected null, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(key, hint, value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (hint is int and isinstance(value, bool)) or not isinstance(value, hint):
        raise ParamsError(f"{key}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(prefix: str, cls: Any, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix or 'params'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    dot = f"{prefix}." if prefix else ""
    for key in raw:
        if key not in names:
            raise ParamsError(f"{dot}{key}: unknown key; known keys here: {', '.join(names)} (check the spelling)")
    missing = [n for n in names if n not in raw]
    if missing:
        raise ParamsError(f"{dot}{missing[0]}: missing; add it to params.yaml (see the README's parameter list)")
    values = {n: _check_type(f"{dot}{n}", raw[n], hints[n]) for n in names}
    try:
        return cls(**values)
    except ParamsError as err:
        if prefix.startswith("models.") and str(err).startswith("models.*"):
            raise ParamsError(str(err).replace("models.*", prefix, 1)) from None
        raise


def parse_params(raw: dict[str, Any]) -> Params:
    return _build("", Params, raw)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the project root, where params.yaml lives")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_params(raw or {})


def as_dict(params: Any) -> Any:
    """Plain-data copy of params (or a part of it) for saving beside outputs."""
    return dataclasses.asdict(params) if dataclasses.is_dataclass(params) else params
