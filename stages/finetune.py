"""Stage finetune_<key>: QLoRA fine-tuning of one model with the Hugging Face Trainer (both models run this script).

    python -m stages.finetune llama      (run by `dvc repro` as finetune_llama; deepseek likewise)

Reads params: seed, models.<key>, quantization, lora, train, data.max_length. Reads models/base/<key>/ and
data/tokenized/<key>/. Writes models/adapters/<key>/ (adapter safetensors, resolved params, library versions),
metrics/finetune_<key>.json and the per-step series in plots/<key>/ (DVCLive). Checkpoints go to
checkpoints/<key>/ every train.save_steps steps; a rerun after a crash resumes from the last one.
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
from duel.io import atomic_dir, read_json, write_json
from duel.modeling import (
    add_lora,
    attention_implementation,
    checkpointed_layers,
    compile_layers,
    decoder_layers,
    gpu_memory_gib,
    kernels_implementation,
    load_base_model,
    load_tokenizer,
    switch_on_checkpointing,
    versions,
)
from duel.params import as_dict, load_params
from duel.telemetry import GpuSampler, Stopwatch, memory_kind, torch_memory
from duel.training import (
    AnswerCollator,
    LiveStep,
    QuietLive,
    ReviewDataset,
    StepTelemetry,
    answer_loss,
    micro_batch_tokens,
    step_token_counts,
    train_with_backoff,
    training_arguments,
    training_order,
    with_micro_batch,
)


def main() -> None:
    key = sys.argv[1]
    params = load_params()
    model_params = params.model(key)
    set_seed(params.seed)
    base, tokens = Path("models/base") / key, Path("data/tokenized") / key
    checkpoints, adapter_dir = Path("checkpoints") / key, Path("models/adapters") / key
    total_gib = gpu_memory_gib()
    if params.train.memory_budget_gib and total_gib:
        torch.cuda.set_per_process_memory_fraction(min(1.0, params.train.memory_budget_gib / total_gib))

    train = pd.read_parquet(tokens / "train.parquet")
    answer_ids = tuple(read_json(tokens / "verbalizer.json")["token_ids"])
    lengths = train["n_tokens"].to_numpy()
    order = training_order(lengths, params.train.steps, params.train.batch_size, params.seed)
    dataset = ReviewDataset(train.iloc[order], answer_ids)

    tokenizer = load_tokenizer(base)
    attention = attention_implementation(params.train.attention, params.train.padding == "packed")
    kernels = kernels_implementation(params.train.kernels, params.train.compile)
    largest = int(micro_batch_tokens(lengths, order, params)[1].max())  # sizes checkpointing to the memory budget
    model = add_lora(load_base_model(base, model_params, params, attention, kernels), model_params, params, largest)
    compile_layers(model, params.train.compile)
    trainable, total_params = model.get_nb_trainable_parameters()
    print(
        f"finetune {key}: gradient checkpointing in {checkpointed_layers(model)} of {len(decoder_layers(model))} "
        f"layers (train.gradient_checkpointing {params.train.gradient_checkpointing}, memory budget "
        f"{params.train.memory_budget_gib or 'the whole GPU'} GiB, largest micro-batch {largest} tokens)"
    )

    # trainer_state.json is the last file the Trainer writes: a folder without it is a save cut short by a crash.
    complete = [p for p in checkpoints.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    last = max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)
    start_step = int(last.name.split("-")[1]) if last else 0
    if last:
        print(f"finetune {key}: resuming from {last} (step {start_step})")
    live = QuietLive(str(Path("plots") / key), dvcyaml=False, save_dvc_exp=False, report=None, resume=last is not None)
    collator = AnswerCollator.from_params(tokenizer.pad_token_id, params)
    token_counts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def build(micro_batch: int) -> Trainer:
        run_params = with_micro_batch(params, micro_batch)
        token_counts[micro_batch] = step_token_counts(lengths, order, run_params)
        return Trainer(
            model=model,
            args=training_arguments(run_params, checkpoints),
            train_dataset=dataset,
            data_collator=collator,
            compute_loss_func=answer_loss,
            callbacks=[
                StepTelemetry(*token_counts[micro_batch], params.train.batch_size),
                LiveStep(live),
                DVCLiveCallback(live=live),
            ],
        )

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sampler = GpuSampler().start()
    watch = Stopwatch()
    run = train_with_backoff(
        build,
        params.train.batch_size,
        params.train.micro_batch,
        str(last) if last else None,
        lambda: switch_on_checkpointing(model),
    )
    trainer = run.trainer
    train_s = watch.elapsed_s()
    hardware = sampler.stop() | torch_memory()
    real_tokens, padded_tokens = token_counts[run.micro_batch]

    logged = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    losses = [loss for _, loss in logged]
    # Each logged loss is the mean over the steps since the previous log; the log history survives a resume (the
    # Trainer's own training_loss covers only the steps this process ran).
    windows = np.diff([0] + [step for step, _ in logged])
    timed = slice(start_step, None)  # after a resume, only the steps this process ran were timed
    steps_timed = params.train.steps - start_step
    metrics = {
        "model": key,
        "final_loss": round(losses[-1], 4),
        "train_loss_mean": round(float(np.dot(windows, losses) / windows.sum()), 4),
        "steps": trainer.state.global_step,
        "resumed_from_step": start_step,
        "train_time_s": round(train_s, 2),
        "reviews_per_s": round(steps_timed * params.train.batch_size / train_s, 3),
        "tokens_per_s": round(float(real_tokens[timed].sum()) / train_s, 1),
        "padded_tokens_per_s": round(float(padded_tokens[timed].sum()) / train_s, 1),
        "padding_share": round(1 - float(real_tokens.sum()) / float(padded_tokens.sum()), 4),
        **hardware,
        "energy_j_per_step": round(hardware["energy_j"] / steps_timed, 2) if hardware["energy_j"] else None,
        "memory_plot": memory_kind(),
        "attention": attention,
        "kernels": kernels,
        "compiled": params.train.compile,
        "precision": params.train.precision,
        "quantization": f"{params.quantization.quant_type}{'-dq' if params.quantization.double_quant else ''}"
        if params.quantization.enabled
        else "none",
        "padding": params.train.padding,
        "gradient_checkpointing": model.is_gradient_checkpointing,
        "checkpointed_layers": checkpointed_layers(model),
        "memory_budget_gib": params.train.memory_budget_gib,
        "micro_batch": run.micro_batch,
        "grad_accum": params.train.batch_size // run.micro_batch,
        "oom_retries": run.oom_retries,
        "trainable_parameters": trainable,
        "total_parameters": total_params,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    with atomic_dir(adapter_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        write_json(
            tmp / "training.json",
            {"params": as_dict(params), "model_key": key, "metrics": metrics, "versions": versions()},
        )
    write_json(f"metrics/finetune_{key}.json", metrics)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the run is complete: nothing left to resume
    print(
        f"finetune {key}: loss {metrics['final_loss']} after {metrics['steps']} steps in {train_s:.1f} s, "
        f"{metrics['reviews_per_s']} reviews/s, {metrics['tokens_per_s']} tokens/s, attention {attention}, "
        f"kernels {kernels}{', compiled layers' if params.train.compile else ''}"
    )


if __name__ == "__main__":
    cli.run(main)
