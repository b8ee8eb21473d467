"""execution.cuda_graphs: each micro-batch's forward pass, loss and backward pass captured once as a CUDA graph for each
row length, then replayed. The host launches one graph where it launched thousands of kernels, each from Python
(PEFT's LoRA layers double their number), so the GPU no longer waits on the host between them.

A graph replays fixed shapes at fixed addresses, with the host's numbers it was captured with. Flattened rows
(AnswerCollator with graph_tokens) hold a micro-batch's reviews end to end and one padding sequence up to the next
multiple of execution.graph_tokens, so a run meets a handful of lengths, each with the same number of sequences and
answers, and the attention's bound on a sequence's length is data.max_length in every batch. Each batch is copied
into the inputs of its length's graph before the replay.

The Trainer runs everything else as before: gradient accumulation, clipping, the optimizer step, logging. The LoRA
gradients accumulate into tensors allocated once, outside the graphs (the Trainer's zero_grad sets them to None;
they are zeroed and put back before the next micro-batch). The run's first micro-batch runs eagerly on the capture
stream: the warm-up CUDA asks for before a capture (libraries set up their handles and workspaces lazily). Every
other new length is captured when first met, then replayed; all graphs share one memory pool, as they never run at
the same time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import Trainer

from duel.errors import TrainingError
from duel.telemetry import Stopwatch


@dataclass
class Captured:
    """One row length's graph, the tensors it reads (copied into before each replay) and the ones it writes."""

    graph: torch.cuda.CUDAGraph
    inputs: dict[str, Any]
    num_items: torch.Tensor | None
    loss: torch.Tensor
    label_word_sum: torch.Tensor
    reviews: torch.Tensor


class GraphedTrainer(Trainer):
    """The Hugging Face Trainer whose training_step replays a CUDA graph per row length. compute_loss_func must be
    duel.training.AnswerLoss: its `terms` run inside the graph, its `add` after each replay."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not torch.cuda.is_available():
            raise TrainingError("execution.cuda_graphs: needs a CUDA GPU; set it to false on this machine")
        if self.args.world_size > 1:
            raise TrainingError("execution.cuda_graphs: runs in one process; set it to false or data_parallel: 1")
        self.captured: dict[int, Captured] = {}
        self.pool: Any = None
        self.stream: torch.cuda.Stream | None = None
        self.trainable: list[torch.nn.Parameter] = []
        self.grads: list[torch.Tensor] = []

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        self.attach_grads(model)
        if self.stream is None:  # the warm-up: this micro-batch eagerly, on the stream the captures use
            self.stream = torch.cuda.Stream()
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                loss = super().training_step(model, inputs, num_items_in_batch)
            torch.cuda.current_stream().wait_stream(self.stream)
            torch.cuda.empty_cache()  # its activations' blocks: the graphs' pool cannot reuse them
            return loss
        length = inputs["input_ids"].shape[1]
        if length not in self.captured:
            watch = Stopwatch()
            self.captured[length] = self.capture(model, inputs, num_items_in_batch)
            seconds = watch.elapsed_s()
            print(
                f"cuda_graphs: captured the {length}-token row's step in {seconds:.1f} s ({len(self.captured)} graphs)"
            )
        captured = self.captured[length]
        load(captured, inputs, num_items_in_batch)
        captured.graph.replay()
        self.compute_loss_func.add(captured.label_word_sum, captured.reviews)
        return captured.loss.clone()

    def attach_grads(self, model: torch.nn.Module) -> None:
        """The gradients' own tensors back on the trainable parameters, zeroed, after the Trainer's zero_grad (or
        before the first step) set them to None; left as they are between the micro-batches of one step."""
        if not self.trainable:
            self.trainable = [p for p in model.parameters() if p.requires_grad]
            self.grads = [torch.zeros_like(p) for p in self.trainable]
        emptied = [i for i, p in enumerate(self.trainable) if p.grad is None]
        if emptied:
            torch._foreach_zero_([self.grads[i] for i in emptied])
            for i in emptied:
                self.trainable[i].grad = self.grads[i]
        if any(p.grad is not g for p, g in zip(self.trainable, self.grads, strict=True)):
            raise TrainingError("execution.cuda_graphs: a gradient was replaced outside the graphs; set it to false")

    def capture(self, model: torch.nn.Module, inputs: dict[str, Any], num_items: torch.Tensor | int | None) -> Captured:
        """The forward pass, AnswerLoss's terms and the backward pass on copies of this batch's tensors, captured as a
        graph (nothing runs: the replay that follows computes this batch)."""
        static = {k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()}
        items = None if num_items is None else torch.as_tensor(num_items, device=static["input_ids"].device).clone()
        labels = static["labels"]
        forward = {k: v for k, v in static.items() if k != "labels"}
        if self.model_accepts_loss_kwargs and items is not None:  # as Trainer.compute_loss passes it
            forward["num_items_in_batch"] = items
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                with self.compute_loss_context_manager():
                    loss, label_word_sum, reviews = self.compute_loss_func.terms(model(**forward), labels, items)
                self.accelerator.backward(loss)
                loss = loss.detach()
        except torch.OutOfMemoryError:
            raise  # for the out-of-memory back-off
        except RuntimeError as error:
            raise TrainingError(
                f"execution.cuda_graphs: capturing the step of a {labels.shape[1]}-token row failed ({error}); "
                "set it to false"
            ) from error
        self.pool = graph.pool()
        return Captured(graph, static, items, loss, label_word_sum, reviews)


def load(captured: Captured, inputs: dict[str, Any], num_items: torch.Tensor | int | None) -> None:
    """This batch into the captured graph's inputs; its host numbers (the sequence bound) must be the captured ones."""
    for key, value in inputs.items():
        held = captured.inputs[key]
        if torch.is_tensor(value):
            held.copy_(value, non_blocking=True)
        elif value != held:
            raise TrainingError(f"execution.cuda_graphs: {key} {value} differs from the captured {held}")
    if captured.num_items is not None:
        captured.num_items.copy_(torch.as_tensor(num_items), non_blocking=True)
