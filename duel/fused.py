"""execution.fuse_projections: the LoRA projections that read the same input, q/k/v in attention and gate/up in the
MLP, computed together. PEFT runs each adapted projection on its own: the base product, the adapter's dropout, its
two small products, the scaling and the sum, some six kernels each, 30 for the five. Fused, a group takes one
dropout kernel for all its members' masks (drawn independently, as PEFT draws them), one batched product per LoRA
factor, and, over unquantized base weights (dequantize_base, or no quantization), one batched base product over the
members' weights laid end to end (they become views into it: no memory is added), into which the second LoRA
product adds the update. Over a 4-bit base each member keeps its own bitsandbytes product. The adapters' parameters
stay PEFT's own, so the saved adapter, its checkpoints and the optimizer see the same tensors.

The decoder layer still calls each projection as a module (`self.q_proj(hidden_states)`, ...), in its own order:
whichever member is called first with a new input computes the group and keeps the others' outputs until they are
called with that same input, so the layer's code, gradient checkpointing's recompute and Liger's MLP run unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

# The projections of a Llama-style decoder layer that read the same input, by module name.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedGroup:
    """One decoder layer's projections that share an input (PEFT LoRA Linear layers over the same in_features and
    out_features), computed together."""

    def __init__(self, members: list[Any]) -> None:
        self.members = members
        self.adapter = members[0].active_adapters[0]
        self.weight = self._fused_base_weight()
        self.source: torch.Tensor | None = None  # the input the pending outputs were computed from
        self.pending: dict[int, torch.Tensor] = {}

    def _fused_base_weight(self) -> torch.Tensor | None:
        """The members' unquantized base weights end to end, each member's weight now a view into it; None over a
        4-bit (or biased) base."""
        bases = [member.base_layer for member in self.members]
        if any(type(base) is not torch.nn.Linear or base.bias is not None for base in bases):
            return None
        fused = torch.cat([base.weight.detach() for base in bases])
        rows = bases[0].out_features
        for i, base in enumerate(bases):
            base.weight = torch.nn.Parameter(fused[i * rows : (i + 1) * rows], requires_grad=False)
        return fused

    def __call__(self, index: int, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x is self.source and index in self.pending:
            out = self.pending.pop(index)
            if not self.pending:
                self.source = None
            return out
        member = self.members[index]
        if member.disable_adapters or member.merged or list(member.active_adapters) != [self.adapter]:
            return type(member).forward(member, x, *args, **kwargs)  # PEFT's own path
        outputs = self.outputs(x)
        self.source, self.pending = x, {i: out for i, out in enumerate(outputs) if i != index}
        return outputs[index]

    def outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each member's base output plus its scaled LoRA update, as PEFT's Linear.forward computes them."""
        first, n = self.members[0], len(self.members)
        lora_a = torch.stack([m.lora_A[self.adapter].weight for m in self.members])  # n x r x in
        lora_b = torch.stack([m.lora_B[self.adapter].weight for m in self.members])  # n x out x r
        dropout = first.lora_dropout[self.adapter]
        p = dropout.p if isinstance(dropout, torch.nn.Dropout) else 0.0
        lead, width = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, width)
        # PEFT casts the adapter's input to its weights' dtype unless autocast (or cast_input_dtype_enabled) says not
        cast = first.cast_input_dtype_enabled and not torch.is_autocast_enabled(x.device.type)
        lora_in = flat.to(lora_a.dtype) if cast else flat
        dropped = F.dropout(lora_in.expand(n, *flat.shape), p, first.training)  # a mask of its own per member
        low = torch.bmm(dropped, lora_a.transpose(1, 2))  # n x tokens x r
        scaling = first.scaling[self.adapter]
        if self.weight is not None:  # the base product and the update in two batched products, each member's own
            # output contiguous (Liger's kernels and the attention would copy interleaved ones)
            base = torch.bmm(flat.expand(n, *flat.shape), self.weight.view(n, -1, width).transpose(1, 2))
            summed = torch.baddbmm(base, low.to(base.dtype), lora_b.transpose(1, 2).to(base.dtype), alpha=scaling)
            return [summed[i].view(*lead, -1) for i in range(n)]
        update = torch.bmm(low, lora_b.transpose(1, 2))  # n x tokens x out
        outs = []
        for i, member in enumerate(self.members):
            base = member.base_layer(x)
            outs.append(torch.add(base, update[i].view(*lead, -1).to(base.dtype), alpha=scaling))
        return outs


def fuse_projections(model: Any) -> int:
    """Fuse each decoder layer's groups (GROUPS) whose members are all LoRA-adapted with equal shapes; the number of
    groups fused."""
    from peft.tuners.lora import LoraLayer  # PEFT's Linear, and its bitsandbytes Linear4bit over a 4-bit base

    fused = 0
    for module in model.modules():
        for names in GROUPS:
            members = [getattr(module, name, None) for name in names]
            if not all(isinstance(m, LoraLayer) for m in members):
                continue
            shapes = {(m.in_features, m.out_features) for m in members}
            if len(shapes) > 1 or any(len(m.active_adapters) != 1 for m in members):
                continue
            group = FusedGroup(members)
            for index, member in enumerate(members):
                member.forward = functools.partial(group, index)  # the instance's forward: the module's call is kept
            fused += 1
    return fused


def fused_groups(model: Any) -> int:
    """How many groups of model's projections fuse_projections fused (0 when off)."""
    groups = {id(m.forward.func) for m in model.modules() if isinstance(m.__dict__.get("forward"), functools.partial)}
    return len(groups)
