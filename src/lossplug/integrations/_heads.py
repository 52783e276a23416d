"""The output layers the fused loss can stand in for, and the operands it gets from each.

The fused op computes ``hidden @ weight.T + bias`` a block at a time. A plain ``nn.Linear`` gives
its weight and bias. PEFT's wrappers are reduced to the same form:

* ``modules_to_save=["lm_head"]`` (``ModulesToSaveWrapper``): the copy of the active adapter is the
  layer that runs (and is trained); with adapters disabled, the original.
* LoRA on the output layer (``lora.Linear``): ``x W^T + b + s * B(A(dropout(x)))`` is one linear
  map of the widened input ``[x, s * A(dropout(x))]`` with the widened weight ``[W, B]``, so the
  op gets ``hidden' = cat(x, s * x_A)`` (``[N, D + r]``) and ``weight' = cat(W, B)``. Dropout is
  drawn in the same place of the random stream as the unpatched layer draws it (nothing between
  the output layer and the loss draws), so the mask is the same. The widened weight is a
  ``[V, D + r]`` temporary; folding ``B @ A`` into ``W`` would need one too and would lose the
  dropout. Merged adapters are in ``W`` already; DoRA and LoRA biases are refused.

PEFT is never imported here: its wrappers are recognised by their class names, which is all a
model that has them can hold.
"""

from __future__ import annotations

import torch
from torch import nn

_MODULES_TO_SAVE = "ModulesToSaveWrapper"
_LORA_LINEAR = "Linear"  # peft.tuners.lora.layer.Linear


def head_problem(head: nn.Module) -> str | None:
    """Why the fused loss cannot stand in for ``head`` (``None`` when it can).

    Example:
        >>> head_problem(nn.Linear(4, 8)) is None
        True
        >>> head_problem(nn.Embedding(8, 4))
        'the output layer is a Embedding, not a torch.nn.Linear or a PEFT wrapper of one'
    """
    if type(head) is nn.Linear:
        return None
    if _is_modules_to_save(head):
        inner = [head.original_module, *head.modules_to_save.values()]
        if all(type(module) is nn.Linear for module in inner):
            return None
        return "the output layer saved by PEFT's modules_to_save is not a plain torch.nn.Linear"
    if _is_lora_linear(head):
        return _lora_problem(head)
    kind = type(head).__name__
    return f"the output layer is a {kind}, not a torch.nn.Linear or a PEFT wrapper of one"


def head_forward(head: nn.Module, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """What ``head`` computes when it is not deferring (its class's own forward)."""
    return type(head).forward(head, hidden, *args, **kwargs)


def operands(
    head: nn.Module, hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(hidden, weight, bias)`` such that ``hidden @ weight.T + bias`` is what ``head`` computes
    on ``hidden`` now (active adapter, dropout and all).

    Raises:
        TypeError: ``head`` has become something :func:`head_problem` refuses (an adapter added
            or switched after the patch).
    """
    problem = head_problem(head)
    if problem is not None:
        raise TypeError(f"patch_causal_lm: {problem}")
    if _is_modules_to_save(head):
        head = _active_copy(head)
    if type(head) is nn.Linear:
        return hidden, head.weight, head.bias
    base = head.get_base_layer()
    parts, weights = [hidden], [base.weight]
    if not (head.disable_adapters or head.merged):
        for name in head.active_adapters:
            if name not in head.lora_A:
                continue  # as PEFT's own forward: an active adapter this layer does not have
            lora_a, lora_b = head.lora_A[name], head.lora_B[name]
            # the same operations, in the same order, as lora.Linear.forward: same dropout mask
            low = lora_a(head.lora_dropout[name](hidden.to(lora_a.weight.dtype)))
            parts.append((low * head.scaling[name]).to(hidden.dtype))
            weights.append(lora_b.weight.to(base.weight.dtype))
    if len(parts) == 1:
        return hidden, base.weight, base.bias
    return torch.cat(parts, dim=-1), torch.cat(weights, dim=1), base.bias


def _is_modules_to_save(head: nn.Module) -> bool:
    return type(head).__name__ == _MODULES_TO_SAVE and hasattr(head, "original_module")


def _is_lora_linear(head: nn.Module) -> bool:
    return (
        type(head).__name__ == _LORA_LINEAR
        and type(head).__module__.startswith("peft.")
        and hasattr(head, "lora_A")
    )


def _active_copy(head: nn.Module) -> nn.Module:
    """The layer a ``ModulesToSaveWrapper`` runs now (as its ``forward`` chooses it)."""
    active = head.active_adapters
    if head.disable_adapters or not active or any(a not in head.modules_to_save for a in active):
        return head.original_module
    return head.modules_to_save[active[0]]


def _lora_problem(head: nn.Module) -> str | None:
    if type(head.get_base_layer()) is not nn.Linear:
        return "the LoRA-wrapped output layer is not a plain torch.nn.Linear"
    if getattr(head, "fan_in_fan_out", False):
        return "the LoRA output layer stores its weight transposed (fan_in_fan_out)"
    for name in head.lora_A:
        if name in getattr(head, "lora_variant", {}):
            return f"LoRA adapter {name!r} of the output layer is a variant (DoRA …)"
        lora_a, lora_b = head.lora_A[name], head.lora_B[name]
        if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
            return f"LoRA adapter {name!r} of the output layer is not made of torch.nn.Linear"
        if lora_b.bias is not None:
            return f"LoRA adapter {name!r} of the output layer has a bias (lora_bias=True)"
    return None
