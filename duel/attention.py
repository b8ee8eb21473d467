"""Attention for packed rows without a mask: execution.attention "varlen", PyTorch's own variable-length Flash Attention
(torch.nn.attention.varlen, CUDA) registered as a transformers attention implementation (AttentionInterface).

A packed row holds several reviews, each attending to itself only. SDPA gets that from a block-diagonal mask of
width x width per row: the kernels compute every block and cuDNN plans each new shape on the CPU. Variable-length
attention takes the reviews' boundaries instead (cu_seq_lens, the keyword arguments transformers' Flash Attention
path reads; the collator computes them on the CPU) and computes each review's own causal block only.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from typing import Any

import torch

VARLEN = "varlen"
FLEX = "flex_attention"  # transformers' own FlexAttention, on its packed-sequence block mask


def varlen_available() -> bool:
    """torch.nn.attention.varlen (PyTorch 2.9 on) and a CUDA GPU its Flash Attention kernels run on: Ampere (compute
    capability 8.0) or newer; a T4 or V100 is not."""
    return (
        torch.cuda.is_available()
        and torch.cuda.get_device_capability(0)[0] >= 8
        and importlib.util.find_spec("torch.nn.attention.varlen") is not None
    )


@functools.cache
def _varlen_signature() -> tuple[dict[str, Any], bool]:
    """varlen_attn's keywords for causal attention, and whether it takes a scale: PyTorch's signature changed after
    2.11 (is_causal became window_size, scale was added). Read once, not in every layer's call."""
    from torch.nn.attention.varlen import varlen_attn

    accepted = inspect.signature(varlen_attn).parameters
    return ({"is_causal": True} if "is_causal" in accepted else {"window_size": (-1, 0)}), "scale" in accepted


def varlen_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention within each sequence of (tokens, heads, head_dim) tensors."""
    from torch.nn.attention.varlen import varlen_attn

    causal, takes_scale = _varlen_signature()
    options: dict[str, Any] = dict(causal)
    if takes_scale:
        options["scale"] = scale
    elif abs(scale - query.shape[-1] ** -0.5) > 1e-9:
        raise ValueError(f"attention varlen: this PyTorch's varlen_attn has no scale argument (scale {scale})")
    return varlen_attn(query, key, value, cu_seq_lens, cu_seq_lens, max_length, max_length, **options)


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: (batch, heads, tokens, head_dim) in, (batch, tokens, heads, head_dim)
    out. Needs the collator's cu_seq_lens_q and max_length_q (packed rows, no padding mask)."""
    cu_seq_lens, max_length = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu_seq_lens is None or max_length is None or attention_mask is not None:
        raise ValueError(
            "execution.attention: varlen needs packed rows (execution.padding: packed or flattened); use sdpa for "
            "padded batches"
        )
    batch, heads, tokens, head_dim = query.shape
    if key.shape[1] != heads:  # grouped-query attention: one key/value head serves several query heads
        repeat = heads // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)

    def flat(states: torch.Tensor) -> torch.Tensor:
        return states.transpose(1, 2).reshape(batch * tokens, heads, head_dim)

    scale = scaling if scaling is not None else head_dim**-0.5
    output = varlen_kernel(flat(query), flat(key), flat(value), cu_seq_lens, max_length, scale)
    return output.view(batch, tokens, heads, head_dim), None


def register() -> None:
    """Make "varlen" an attn_implementation for from_pretrained. No mask function is registered with it, so
    transformers builds no mask for it (its early exit for attention kinds without one)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)
