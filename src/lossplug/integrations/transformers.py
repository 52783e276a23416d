"""Train a Hugging Face causal LM through :func:`lossplug.linear_cross_entropy`.

:func:`patch_causal_lm` makes a model's training loss (a forward call with ``labels``) come from
the fused linear cross-entropy: the ``[batch, seq, vocab]`` logits are never built, the loss and
its gradients are those of the unpatched model (``num_items_in_batch`` included, so gradient
accumulation stays exact), and the step's :class:`~lossplug.TokenStats` come with the output, where
:class:`~lossplug.LossMonitor` picks them up without another pass over anything.

How: in a call with labels the output layer hands its input (the last hidden states) on instead of
multiplying it out, and the model's loss function, which receives it, runs the fused op with the
output layer's weight. The model's own forward does everything else (caches, masks, position ids,
``shift_labels``, a router's auxiliary loss), so the patch follows the library from release to
release. Which models it accepts is decided by what their forward does, not by their name
(:mod:`lossplug.integrations._families`): the output layer is a linear map (a plain
``nn.Linear``, or PEFT's ``modules_to_save`` or LoRA wrapper of one, :mod:`._heads`), and between
it and ``self.loss_function`` the forward does nothing, or only what the fused op reproduces
exactly (a constant logit scale or divisor, soft-capping). Any other model is refused with its
class, the reason and the fallback, never silently wrong.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lossplug.integrations._families import (
    Fold,
    UnsupportedModelError,
    language_model_inside,
    read_fold,
    refuse,
)
from lossplug.integrations._heads import head_forward, head_problem, operands
from lossplug.monitoring.handoff import SOURCE_ATTR, models_with_stats, pop_token_stats
from lossplug.ops._dispatch import check_backend
from lossplug.ops._spec import LossSpec
from lossplug.ops.linear_cross_entropy import _linear_cross_entropy
from lossplug.ops.stats import TokenStats

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "LossplugCallback",  # noqa: F822 (resolved by __getattr__, on first use)
    "UnsupportedModelError",
    "is_patched",
    "patch_causal_lm",
    "patched_models",
    "pop_token_stats",
    "unpatch_causal_lm",
]

#: ``config.model_type`` of the families the test suite checks against the unpatched model, one
#: per kind of forward. Not an allow-list: any model whose forward reads as described above is
#: accepted (``benchmarks/families.py`` checks every family of the installed ``transformers``).
SUPPORTED_MODEL_TYPES = (
    "bert",
    "cohere",
    "gemma",
    "gemma2",
    "gpt2",
    "granite",
    "llama",
    "llava",
    "mistral",
    "mixtral",
    "phi3",
    "qwen2",
    "qwen3",
)

_ATTR = SOURCE_ATTR


class _Patch:
    """What a patched model keeps: the originals, the fused-loss options and the last stats.

    ``spec`` holds the options given to :func:`patch_causal_lm`, validated; each call fills in
    what the model's forward passes (``ignore_index``, the reduction, the shift).

    The patch and the forwards it installs are plain objects that reach the model and its output
    layer through attributes, never through closures, so that ``pickle`` (``ddp_spawn`` sends the
    model to its workers that way) and ``copy.deepcopy`` copy them with the model and point the
    copy's at the copy's own modules.
    """

    def __init__(
        self,
        model: nn.Module,
        head: nn.Module,
        spec: LossSpec,
        fold: Fold,
        backend: str,
        check_target: bool | None,
    ) -> None:
        self.head = head
        self.spec = spec
        # what the forward does to the logits: its scale is folded into the hidden states, its
        # soft-capping is in ``spec``
        self.fold = fold
        self.backend = backend
        self.check_target = check_target
        self.had_loss_function = "_loss_function" in vars(model)
        self.original_loss_function = vars(model).get("_loss_function")
        # a forward already set on the instance (a wrapper of someone else's): run inside ours and
        # put back by unpatch_causal_lm
        self.original_forward: Callable[..., Any] | None = vars(model).get("forward")
        self.deferring = False
        # the thread whose call with labels is in flight (None when that call is being traced
        # by torch.compile): another thread's call (a KPI that outlived its timeout, still
        # generating) must get its logits, and never leave its hidden states to that call's loss
        self.owner: int | None = None
        self.hidden: torch.Tensor | None = None
        self.last_stats: TokenStats | None = None
        # set by LossplugCallback(slice_by=...): a call with labels keeps its inputs (the slice
        # labels are read from them), and a key named here is taken out of the call before the
        # model's forward sees it, should the forward not take it
        self.slice_by: str | Callable[[Any], Any] | None = None
        self.last_inputs: dict[str, Any] | None = None

    def pop_token_stats(self) -> TokenStats | None:
        """The statistics of the last call with labels, once (``None`` if already taken)."""
        stats, self.last_stats = self.last_stats, None
        return stats

    def pop_inputs(self) -> dict[str, Any] | None:
        """The named inputs of the last call with labels while ``slice_by`` is set, once."""
        inputs, self.last_inputs = self.last_inputs, None
        return inputs

    def __getstate__(self) -> dict[str, Any]:
        # A copy has run no call yet: the statistics are handed out once, by the model that
        # computed them (a copy handing them out again would count those tokens twice), and the
        # hidden states of a call in flight belong to that call's graph. slice_by belongs to the
        # callback that set it (and may be a lambda, which does not pickle).
        return {
            **vars(self),
            "deferring": False,
            "owner": None,
            "hidden": None,
            "last_stats": None,
            "slice_by": None,
            "last_inputs": None,
        }


def __getattr__(name: str) -> Any:
    # LossplugCallback subclasses transformers' TrainerCallback, which needs ``accelerate``:
    # imported on first use, so that patching a model never needs either
    if name == "LossplugCallback":
        from lossplug.integrations._hf_callback import LossplugCallback

        return LossplugCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def patch_causal_lm(
    model: nn.Module,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    backend: str = "auto",
    check_target: bool | None = None,
) -> nn.Module:
    """Compute ``model``'s training loss with :func:`lossplug.linear_cross_entropy`, in place.

    After the patch, ``model(input_ids, labels=labels, ...)`` returns the same loss as before
    (the mean over scored tokens, or the sum over ``num_items_in_batch`` when the caller passes
    it, as the ``transformers`` ``Trainer`` does under gradient accumulation) and the same
    gradients, with ``logits=None`` (they are never built) and the step's statistics as
    ``output.token_stats``. Calls without labels (generation, inference) are untouched.
    Patching twice is a no-op; :func:`unpatch_causal_lm` undoes it. A patched model pickles
    (``ddp_spawn``, ``torch.save``) and ``copy.deepcopy`` gives a patched copy that runs its own
    weights, starts with no statistics and is unpatched on its own.

    Accepted: a ``transformers`` causal LM (``...ForCausalLM``, or the language model of a
    vision-language ``...ForConditionalGeneration``) whose forward computes the logits with its
    output layer and passes them to ``self.loss_function`` unchanged, scaled by a constant
    (Cohere, Granite) or soft-capped (Gemma 2 and 3); an auxiliary loss added afterwards (MoE
    routers) is kept. The output layer is a plain ``nn.Linear`` (tied to the embeddings or not,
    possibly the last step of a head module, as BERT's), or PEFT's ``modules_to_save`` or
    (non-DoRA) LoRA wrapper of one. A model that hands its labels to a causal LM inside it gets
    that one patched. Anything else is refused (:mod:`lossplug.integrations._families`).

    Args:
        model: the causal LM, or a PEFT model wrapping one.
        label_smoothing: passed to the fused op (the unpatched model has none).
        z_loss: passed to the fused op (the unpatched model has none).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``, as in the fused op.
        check_target: as in the fused op.

    Returns:
        ``model`` itself.

    Raises:
        UnsupportedModelError: (a ``ValueError``) the model's forward does something between
            the output layer and the loss that the fused op does not reproduce, or its loss is
            not the causal-LM loss; the message names the class, why, and the fallback (return
            the logits and let ``LossMonitor`` score them).
        TypeError: the output layer is not a linear map (a plain ``nn.Linear`` or a supported
            PEFT wrapper of one); the message names the same three things.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from lossplug.integrations.transformers import patch_causal_lm
        >>> config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=1, num_attention_heads=2)
        >>> model = patch_causal_lm(LlamaForCausalLM(config))
        >>> ids = torch.randint(0, 64, (2, 9))
        >>> out = model(input_ids=ids, labels=ids)
        >>> out.logits is None, int(out.token_stats.tokens)
        (True, 16)
    """
    # every option is checked now, not at the first batch
    check_backend(backend)
    spec = LossSpec.validated(label_smoothing=label_smoothing, z_loss=z_loss)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()  # a PEFT wrapper: patch the model inside
    if getattr(model, _ATTR, None) is not None:
        return model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise refuse(model, "it is not a Hugging Face model with an output layer")
    problem = head_problem(head)
    if problem is not None:
        # a TypeError, as for any argument of the wrong kind
        raise TypeError(str(refuse(model, problem)))
    if not _causal_loss(model):
        raise refuse(model, f"its loss is not the causal-LM loss (loss_type={model.loss_type!r})")
    try:
        fold = read_fold(model, head)
    except UnsupportedModelError:
        inner = language_model_inside(model, head)
        if inner is None:
            raise
        # the forward hands its labels to the causal LM inside it, whose loss it returns
        # (Kosmos 2.5, Llama 4's vision-language model): patch that one
        options = dict(label_smoothing=label_smoothing, z_loss=z_loss, backend=backend)
        patch_causal_lm(inner, check_target=check_target, **options)
        return model
    spec = spec.replace(softcap=fold.softcap)
    patch = _Patch(model, head, spec, fold, backend, check_target)
    setattr(model, _ATTR, patch)
    head.forward = _DeferringHeadForward(patch)
    model.loss_function = functools.partial(_fused_loss, patch)
    model.forward = _ForwardWithFusedLoss(model, patch)
    return model


def _causal_loss(model: nn.Module) -> bool:
    """Whether ``model.loss_function`` is the causal-LM loss that the fused op replaces."""
    loss_type = getattr(model, "loss_type", None)
    if loss_type is None:
        return True  # transformers falls back to the causal-LM loss
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    return LOSS_MAPPING.get(loss_type) is ForCausalLMLoss


def unpatch_causal_lm(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_causal_lm` (a no-op on a model that is not patched)."""
    patch: _Patch | None = getattr(model, _ATTR, None)
    if patch is None:
        inner = _patched_inside(model)
        if inner is not None:
            unpatch_causal_lm(inner)
        return model
    del patch.head.forward
    if patch.original_forward is not None:
        model.forward = patch.original_forward
    else:
        del model.forward
    if patch.had_loss_function:
        model._loss_function = patch.original_loss_function
    else:
        del model._loss_function
    delattr(model, _ATTR)
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch_causal_lm` patched ``model`` (or the language model inside it that
    its forward hands the labels to)."""
    return getattr(model, _ATTR, None) is not None or _patched_inside(model) is not None


def _patched_inside(model: nn.Module) -> nn.Module | None:
    """The language model inside ``model`` that :func:`patch_causal_lm` patched for it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    inner = language_model_inside(model, head)
    return inner if inner is not None and getattr(inner, _ATTR, None) is not None else None


def patched_models(module: nn.Module) -> list[nn.Module]:
    """The models inside ``module`` (``module`` itself included) that :func:`patch_causal_lm`
    patched."""
    return models_with_stats(module)


def _in_owning_call(patch: _Patch) -> bool:
    """Whether the output layer runs inside the call with labels that is in flight: in its
    thread, or in code torch.compile traces (which is that call's; the thread is not asked there,
    where it would break the graph)."""
    return torch.compiler.is_compiling() or patch.owner == threading.get_ident()


class _DeferringHeadForward:
    """The output layer's ``forward`` while patched: in a call with labels it hands its input (the
    last hidden states) to the fused loss instead of building the logits."""

    def __init__(self, patch: _Patch) -> None:
        self.patch = patch

    def __call__(
        self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor | None:
        patch = self.patch
        if patch.deferring and _in_owning_call(patch):
            if args or kwargs:  # PEFT's adapter_names (one adapter per row): not one linear map
                raise TypeError(
                    f"patch_causal_lm: the output layer got extra arguments {sorted(kwargs)}; "
                    f"a batch of mixed adapters is not supported (unpatch_causal_lm first)"
                )
            patch.hidden = hidden_states
            if patch.fold.touched:
                # the forward scales or caps the logits before its loss: that arithmetic must run
                # on something, and an empty tensor costs nothing
                return hidden_states.new_empty(0)
            return None  # the output's logits: never built
        return head_forward(patch.head, hidden_states, *args, **kwargs)


class _ForwardWithFusedLoss:
    """The model's ``forward`` while patched: a call with labels runs the model's own forward
    with the output layer deferring to the fused loss, and attaches the call's statistics."""

    def __init__(self, model: nn.Module, patch: _Patch) -> None:
        self.model = model
        self.patch = patch
        self._signature: inspect.Signature | None = None

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        """The forward this one runs; ``inspect.signature(model.forward)`` follows it, so code
        that reads the model's parameters (``generate``, the ``transformers`` Trainer's column
        filter) sees the model's own."""
        if self.patch.original_forward is not None:
            return self.patch.original_forward
        model = self.model
        return type(model).forward.__get__(model, type(model))

    @property
    def __signature__(self) -> inspect.Signature:
        """The model's own signature, plus the key ``slice_by`` names (when the forward does not
        take it), so that the Trainer's column filter (``remove_unused_columns``) keeps it."""
        signature = inspect.signature(self.__wrapped__)
        key = self.patch.slice_by
        if not isinstance(key, str) or key in signature.parameters:
            return signature
        params = list(signature.parameters.values())
        # keyword-only parameters go before a **kwargs
        at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
        params.insert(at, inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=None))
        return signature.replace(parameters=params)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward, patch = self.__wrapped__, self.patch
        if self._signature is None:
            self._signature = inspect.signature(forward)
        slice_by, taken = patch.slice_by, {}
        own_key = isinstance(slice_by, str) and slice_by in self._signature.parameters
        if isinstance(slice_by, str) and not own_key and slice_by in kwargs:
            taken[slice_by] = kwargs.pop(slice_by)
        try:
            bound = self._signature.bind_partial(*args, **kwargs).arguments
        except TypeError:  # let the model's own forward raise its own error
            bound = {}
        labels = bound.get("labels")
        if labels is None:
            return forward(*args, **kwargs)
        # a call's statistics are its own: never the last call's, should its loss not run
        patch.deferring, patch.hidden, patch.last_stats = True, None, None
        patch.owner = None if torch.compiler.is_compiling() else threading.get_ident()
        patch.last_inputs = None if slice_by is None else {**_flat(bound, self._signature), **taken}
        try:
            output = forward(*args, **kwargs)
        finally:
            patch.deferring, patch.hidden = False, None
        if patch.fold.touched:
            output = _without_stand_in(output)
        if patch.last_stats is not None and not isinstance(output, tuple):
            # an attribute, not a key: code that iterates the output's tensors never sees it
            output.token_stats = patch.last_stats.sum()  # the batch's, as documented
        return output

    def __getstate__(self) -> dict[str, Any]:
        # read again from the model in the copy; a signature's defaults need not pickle
        return {**vars(self), "_signature": None}


def _without_stand_in(output: Any) -> Any:
    """``output`` with ``logits`` absent, as a model whose output layer returned ``None`` gives
    it (the empty stand-in went through the forward's scaling in its place)."""
    if isinstance(output, tuple):
        return tuple(x for x in output if not _is_stand_in(x))
    if isinstance(output, dict) and _is_stand_in(output.get("logits")):
        # ModelOutput forbids deleting a key (and ignores setting one to None); a model output
        # built with logits=None has no such key, which is what the caller must see
        OrderedDict.__delitem__(output, "logits")
        object.__setattr__(output, "logits", None)
    return output


def _is_stand_in(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == 0


def _flat(arguments: Mapping[str, Any], signature: inspect.Signature) -> dict[str, Any]:
    """Bound arguments by name, a ``**kwargs`` parameter's entries spread among them."""
    flat: dict[str, Any] = {}
    for name, value in arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            flat.update(value)
        else:
            flat[name] = value
    return flat


def _fused_loss(
    patch: _Patch,
    logits: torch.Tensor | None,
    labels: torch.Tensor,
    vocab_size: int | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **_kwargs: Any,
) -> torch.Tensor:
    hidden = patch.hidden
    if hidden is None or (logits is not None and not _is_stand_in(logits)):
        raise RuntimeError(
            "the lossplug-patched loss function was called outside a patched forward call; "
            "call the model with labels=... (or unpatch_causal_lm(model) first)"
        )
    hidden, weight, bias = operands(patch.head, hidden)
    scale = patch.fold.scale
    if scale != 1.0:
        # scale * (h W^T + b) == (scale h) W^T + scale b: an [N, D] product, not a [V, D] one
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    target = labels if shift_labels is None else shift_labels
    spec = patch.spec.replace(
        ignore_index=ignore_index,
        reduction="mean" if num_items_in_batch is None else "sum",
        shift=shift_labels is None,
    )
    loss, stats = _linear_cross_entropy(
        hidden,
        weight,
        target.to(hidden.device),
        spec,
        bias=bias,
        return_stats=True,
        backend=patch.backend,
        check_target=patch.check_target,
        # one sum per sequence costs nothing more and lets monitors split them by slice
        per_sequence_stats=target.dim() >= 1,
    )
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    patch.last_stats = stats
    return loss
