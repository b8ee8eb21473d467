"""Stage finetune_<key>: QLoRA fine-tuning of one model with the Hugging Face Trainer (both models run this script).

    python -m stages.finetune llama      (run by `dvc repro` as finetune_llama; deepseek likewise)

Reads params: seeds.train, data.max_length, models.<key> (lora_targets, trust_remote_code), quantization, lora, train,
execution (training keys). Reads models/base/<key>/ and data/tokenized/<key>/. Writes models/adapters/<key>/ (adapter
safetensors; training.json: resolved params, the base model's model.json, how it ran, library versions),
metrics/finetune_<key>.json and the per-step series in plots/<key>/ (DVCLive). Checkpoints go to checkpoints/<key>/
every execution.save_steps steps; a rerun after a crash resumes from the last one.

With execution.data_parallel above 1 it re-launches itself under torchrun, one rank per GPU (or CPU process), and
only rank 0 writes. On a host with several GPUs and no CUDA_VISIBLE_DEVICES, it first claims free ones for its
work (duel/parallel.py), so that queued experiments spread over them. Across machines, start it under torchrun
on each (README: several GPUs or machines):

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m stages.finetune llama
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pandas as pd
from transformers import set_seed

from duel import cli, parallel
from duel.checkpointing import (
    checkpointed_layers,
    configure_allocator,
    decoder_layers,
    limit_gpu_memory,
    offloaded_layers,
)
from duel.fused import fuse_projections
from duel.hub import load_tokenizer, model_info, versions
from duel.io import atomic_dir, read_json, write_json
from duel.modeling import (
    add_lora,
    attention_implementation,
    base_for_training,
    base_weights,
    check_lora_targets,
    compile_layers,
    dequantized_layers,
    host_embeddings,
    kernels_implementation,
    load_base_model,
)
from duel.params import as_dict, load_params
from duel.training import (
    AnswerCollator,
    QuietLive,
    ReviewDataset,
    fine_tune,
    finetune_metrics,
    micro_batch_tokens,
    resume_point,
    run_description,
    training_fingerprint,
    training_order,
)


def main() -> None:
    key = sys.argv[1]
    params = load_params()
    execution = params.execution
    allocator = configure_allocator(execution.expandable_segments)  # before CUDA is first used
    parallel.launch("finetune", key, execution, params.train.batch_size)  # free GPUs claimed, or ranks > 1: children
    parallel.init_distributed(execution.micro_batch, params.train.batch_size)
    main_process = parallel.is_main_process()  # rank 0 writes the checkpoints' fingerprint, series and outputs
    set_seed(params.seeds.train)
    base, tokens = Path("models/base") / key, Path("data/tokenized") / key
    checkpoints, adapter_dir = Path("checkpoints") / key, Path("models/adapters") / key
    cap = limit_gpu_memory(execution.memory_budget_gib)  # the budget less the CUDA context's memory

    train = pd.read_parquet(tokens / "train.parquet")
    answer_ids = tuple(read_json(tokens / "verbalizer.json")["token_ids"])
    lengths = train["n_tokens"].to_numpy()
    order = training_order(lengths, params.train.steps, params.train.batch_size, params.seeds.train)
    dataset = ReviewDataset(train.iloc[order], answer_ids)

    packed = execution.padding in ("packed", "flattened")
    attention = attention_implementation(execution.attention, packed, execution.cuda_graphs)
    kernels = kernels_implementation(execution.kernels, execution.compile)
    largest = int(micro_batch_tokens(lengths, order, params)[1].max())  # sizes checkpointing to the memory budget
    model_params = params.model(key)
    loading = time.perf_counter()  # the model's build: load, quantize, plan, LoRA (load_s, within startup_s)
    loaded = load_base_model(base, model_params, params, attention, kernels)
    embeddings = host_embeddings(loaded, model_params, params, largest)  # the table in host memory, or None
    loaded = base_for_training(loaded, model_params, params, largest)
    check_lora_targets(loaded, key, model_params.lora_targets)
    model = add_lora(loaded, model_params, params, largest)
    fused = fuse_projections(model) if execution.fuse_projections else 0
    compile_layers(model, execution.compile)
    load_s = time.perf_counter() - loading
    layers = f"{checkpointed_layers(model)} of {len(decoder_layers(model))} ({offloaded_layers(model)} offloaded)"
    budget = f"{execution.memory_budget_gib:g} GiB" if execution.memory_budget_gib else "none"
    budget += f", torch's allocator capped at {cap:.2f} GiB" if cap else ""
    print(
        f"finetune {key}: gradient checkpointing in {layers} layers (execution.gradient_checkpointing "
        f"{execution.gradient_checkpointing}, memory budget {budget}, largest micro-batch {largest} tokens), "
        f"base weights {base_weights(model)} ({dequantized_layers(model, params.quantization.enabled)} layers "
        f"dequantized), input embeddings in {'host' if embeddings is not None else 'GPU'} memory, fused projection "
        f"groups {fused}, allocator {allocator or 'default'}"
    )

    fingerprint = training_fingerprint(params, key, [tokens / "train.parquet", base / "model.json"])
    last, start_step = resume_point(checkpoints, fingerprint, main_process)
    if last:
        print(f"finetune {key}: resuming from {last} (step {start_step})")
    live = None
    if main_process:
        plots = str(Path("plots") / key)
        live = QuietLive(plots, dvcyaml=False, save_dvc_exp=False, report=None, resume=last is not None)
    collator = AnswerCollator.from_params(load_tokenizer(base).pad_token_id, params, embeddings)
    done = fine_tune(model, dataset, lengths, order, params, collator, live, checkpoints, last)
    if not main_process:
        parallel.end_distributed()  # waits for rank 0 to write the outputs
        return
    metrics = finetune_metrics(done, model, params, start_step, load_s)
    how = run_description(key, model, params, attention, kernels)
    with atomic_dir(adapter_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        training = {"params": as_dict(params), "base": model_info(base), "run": how, "metrics": metrics}
        write_json(tmp / "training.json", training | {"versions": versions()})
    write_json(f"metrics/finetune_{key}.json", {key: metrics})  # the model's key first: one column name per model
    shutil.rmtree(checkpoints, ignore_errors=True)  # the run is complete: nothing left to resume
    parallel.end_distributed()
    print(
        f"finetune {key}: loss {metrics['final_loss']} after {metrics['steps']} steps in {done.seconds:.1f} s (after "
        f"{metrics['startup_s']:.1f} s starting up, {metrics['load_s']:.1f} s of it building the model), "
        f"{metrics['reviews_per_s']} reviews/s, {metrics['tokens_per_s']} tokens/s, attention {attention}, "
        f"kernels {kernels}{compiled(how['compile_cache'])}{on_the_card(metrics, execution.memory_budget_gib)}"
    )


def on_the_card(metrics: dict, budget_gib: float | None) -> str:
    """The closing line's words on the GPU memory the run held, NVML's peak (the CUDA context included), against the
    memory budget: whether a card of the budget's size would have held it."""
    card = metrics.get("nvml_peak_gib")
    if card is None:
        return ""
    verdict = f", {'within' if card <= budget_gib else 'over'} the {budget_gib:g} GiB budget" if budget_gib else ""
    return f"; {card:.2f} GiB on the GPU at its peak{verdict}"


def compiled(cache: dict | None) -> str:
    """The closing line's words on compiled layers: what compiling cost, and whether it started warm."""
    if cache is None:
        return ""
    return (
        f", compiled layers ({cache['seconds']:g} s compiling: {cache['graphs_compiled']} graphs compiled, "
        f"{cache['graphs_from_cache']} from the compile cache)"
    )


if __name__ == "__main__":
    cli.run(main)
