"""execution.offload_embeddings: the frozen input embedding table in host memory. The collator looks each
micro-batch's tokens up there (AnswerCollator's `embeddings`) and the model takes inputs_embeds: the same values,
copied to the GPU with the batch, for hidden x 2 bytes a token instead of the whole table on the GPU."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from duel.errors import TrainingError


class HostEmbedding(torch.nn.Module):
    """Stands in for the input embedding whose table is in host memory: it holds no weights, and the forward hooks
    registered on it (enable_input_require_grads') run on the inputs_embeds the model is given
    (run_embedding_hooks)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise TrainingError(
            "train: the model got token ids, but its input embedding table is in host memory "
            "(execution.offload_embeddings); the collator must pass inputs_embeds (AnswerCollator's embeddings)"
        )


def offload_input_embeddings(model: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Move the model's input embedding table to host memory (in `dtype`, else its own) and put a HostEmbedding in
    its place; returns the table, for the collator. The table on the GPU is freed once nothing else holds it (a head
    tied to it would)."""
    embedding = model.get_input_embeddings()
    table = embedding.weight.detach().to("cpu", dtype or embedding.weight.dtype)
    model.set_input_embeddings(HostEmbedding(*table.shape))
    model.register_forward_pre_hook(run_embedding_hooks, with_kwargs=True)
    return table


def run_embedding_hooks(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Before the model's forward: the forward hooks of its HostEmbedding run on inputs_embeds as they would on the
    embedding's output. enable_input_require_grads' hook makes it require grad: a reentrant checkpoint
    (offloaded_checkpoint) passes gradients only to inputs that want them."""
    embeds, stub = kwargs.get("inputs_embeds"), model.get_input_embeddings()
    if embeds is not None and isinstance(stub, HostEmbedding):
        for hook in stub._forward_hooks.values():
            hook(stub, (None,), embeds)


def look_up(table: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The rows of `table` for `input_ids` (any shape), as the embedding would give them."""
    return F.embedding(input_ids, table)
