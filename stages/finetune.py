"""Stage finetune_<key>: QLoRA fine-tuning of one model with the Hugging Face Trainer (both models run this script).

    python -m stages.finetune llama      (run by `dvc repro` as finetune_llama; deepseek likewise)

Reads params: seed, data.max_length, models.<key> (lora_targets, trust_remote_code), quantization, lora, train,
execution (training keys). Reads models/base/<key>/ and data/tokenized/<key>/. Writes models/adapters/<key>/ (adapter
safetensors; training.json: resolved params, the base model's model.json, how it ran, library versions),
metrics/finetune_<key>.json and the per-step series in plots/<key>/ (DVCLive). Checkpoints go to checkpoints/<key>/
every execution.save_steps steps; a rerun after a crash resumes from the last one.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import Trainer, set_seed
from transformers.integrations import DVCLiveCallback

from duel import cli
from duel.checkpointing import checkpointed_layers, decoder_layers, gpu_memory_gib
from duel.checkpointing import switch_on_checkpointing as switch_on
from duel.hub import load_tokenizer, model_info, versions
from duel.io import atomic_dir, read_json, write_json
from duel.modeling import (
    add_lora,
    attention_implementation,
    compile_layers,
    kernels_implementation,
    load_base_model,
    quantization_name,
)
from duel.params import as_dict, load_params
from duel.telemetry import GpuSampler, Stopwatch, memory_kind, peak_memory
from duel.training import (
    AnswerCollator,
    LiveStep,
    QuietLive,
    ReviewDataset,
    StepTelemetry,
    answer_loss,
    last_checkpoint,
    loss_summary,
    micro_batch_tokens,
    step_token_counts,
    throughput,
    train_with_backoff,
    training_arguments,
    training_order,
    with_micro_batch,
)


def main() -> None:
    key = sys.argv[1]
    params = load_params()
    execution = params.execution
    set_seed(params.seed)
    base, tokens = Path("models/base") / key, Path("data/tokenized") / key
    checkpoints, adapter_dir = Path("checkpoints") / key, Path("models/adapters") / key
    total_gib = gpu_memory_gib()
    if execution.memory_budget_gib and total_gib:
        torch.cuda.set_per_process_memory_fraction(min(1.0, execution.memory_budget_gib / total_gib))

    train = pd.read_parquet(tokens / "train.parquet")
    answer_ids = tuple(read_json(tokens / "verbalizer.json")["token_ids"])
    lengths = train["n_tokens"].to_numpy()
    order = training_order(lengths, params.train.steps, params.train.batch_size, params.seed)
    dataset = ReviewDataset(train.iloc[order], answer_ids)

    attention = attention_implementation(execution.attention, execution.padding == "packed")
    kernels = kernels_implementation(execution.kernels, execution.compile)
    largest = int(micro_batch_tokens(lengths, order, params)[1].max())  # sizes checkpointing to the memory budget
    model_params = params.model(key)
    model = add_lora(load_base_model(base, model_params, params, attention, kernels), model_params, params, largest)
    compile_layers(model, execution.compile)
    layers = len(decoder_layers(model))
    print(
        f"finetune {key}: gradient checkpointing in {checkpointed_layers(model)} of {layers} layers "
        f"(execution.gradient_checkpointing {execution.gradient_checkpointing}, memory budget "
        f"{execution.memory_budget_gib or 'the whole GPU'} GiB, largest micro-batch {largest} tokens)"
    )

    last, start_step = last_checkpoint(checkpoints)
    if last:
        print(f"finetune {key}: resuming from {last} (step {start_step})")
    live = QuietLive(str(Path("plots") / key), dvcyaml=False, save_dvc_exp=False, report=None, resume=last is not None)
    collator = AnswerCollator.from_params(load_tokenizer(base).pad_token_id, params)
    token_counts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def build(micro_batch: int) -> Trainer:
        run_params = with_micro_batch(params, micro_batch)
        token_counts[micro_batch] = step_token_counts(lengths, order, run_params)
        callbacks = [StepTelemetry(*token_counts[micro_batch], params.train.batch_size), LiveStep(live)]
        return Trainer(
            model=model,
            args=training_arguments(run_params, checkpoints),
            train_dataset=dataset,
            data_collator=collator,
            compute_loss_func=answer_loss,
            callbacks=[*callbacks, DVCLiveCallback(live=live)],
        )

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sampler, watch = GpuSampler().start(), Stopwatch()
    resume = str(last) if last else None
    run = train_with_backoff(build, params.train.batch_size, execution.micro_batch, resume, lambda: switch_on(model))
    train_s = watch.elapsed_s()
    hardware = sampler.stop() | peak_memory()
    steps_timed = params.train.steps - start_step
    trainable, total_params = model.get_nb_trainable_parameters()
    metrics = {
        **loss_summary(run.trainer.state.log_history),
        "steps": run.trainer.state.global_step,
        "resumed_from_step": start_step,
        **throughput(params, start_step, train_s, *token_counts[run.micro_batch]),
        **hardware,
        "energy_j_per_step": round(hardware["energy_j"] / steps_timed, 2) if hardware["energy_j"] else None,
        "checkpointed_layers": checkpointed_layers(model),
        "micro_batch": run.micro_batch,
        "grad_accum": params.train.batch_size // run.micro_batch,
        "oom_retries": run.oom_retries,
        "trainable_parameters": trainable,
        "total_parameters": total_params,
    }
    how = {
        "model": key,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "attention": attention,
        "kernels": kernels,
        "compiled": execution.compile,
        "precision": execution.precision,
        "quantization": quantization_name(params.quantization),
        "padding": execution.padding,
        "gradient_checkpointing": f"{checkpointed_layers(model)} of {layers} layers",
        "memory": memory_kind(),
    }
    with atomic_dir(adapter_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        write_json(
            tmp / "training.json",
            {
                "params": as_dict(params),
                "base": model_info(base),
                "run": how,
                "metrics": metrics,
                "versions": versions(),
            },
        )
    write_json(f"metrics/finetune_{key}.json", {key: metrics})  # the model's key first: one column name per model
    shutil.rmtree(checkpoints, ignore_errors=True)  # the run is complete: nothing left to resume
    print(
        f"finetune {key}: loss {metrics['final_loss']} after {metrics['steps']} steps in {train_s:.1f} s, "
        f"{metrics['reviews_per_s']} reviews/s, {metrics['tokens_per_s']} tokens/s, attention {attention}, "
        f"kernels {kernels}{', compiled layers' if execution.compile else ''}"
    )


if __name__ == "__main__":
    cli.run(main)
