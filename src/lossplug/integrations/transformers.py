"""Train a Hugging Face causal LM through :func:`lossplug.linear_cross_entropy`.

:func:`patch_causal_lm` makes a model's training loss (a forward call with ``labels``) come from
the fused linear cross-entropy: the ``[batch, seq, vocab]`` logits are never built, the loss and
its gradients are those of the unpatched model (``num_items_in_batch`` included, so gradient
accumulation stays exact), and the step's :class:`~lossplug.TokenStats` come with the output, where
:class:`~lossplug.LossMonitor` picks them up without another pass over anything.

How: in a call with labels the output layer hands its input (the last hidden states) on instead of
multiplying it out, and the model's loss function, which receives it, runs the fused op with the
output layer's weight. The model's own forward does everything else (caches, masks, position ids,
``shift_labels``), so the patch follows the library from release to release; families whose
forward changes the logits between the output layer and the loss (Gemma 2's soft-capping,
Cohere's logit scale, Granite's scaling, router losses) are refused rather than silently wrong.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lossplug.monitoring.handoff import SOURCE_ATTR, models_with_stats, pop_token_stats
from lossplug.ops._dispatch import check_backend
from lossplug.ops._spec import LossSpec
from lossplug.ops.linear_cross_entropy import _linear_cross_entropy
from lossplug.ops.stats import TokenStats

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "LossplugCallback",  # noqa: F822 (resolved by __getattr__, on first use)
    "is_patched",
    "patch_causal_lm",
    "patched_models",
    "pop_token_stats",
    "unpatch_causal_lm",
]

#: ``config.model_type`` of the families whose forward is "output layer, then the loss function"
#: with nothing in between; each is checked against the unpatched model in the test suite.
SUPPORTED_MODEL_TYPES = ("gemma", "gpt2", "llama", "mistral", "phi3", "qwen2", "qwen3")

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
        head: nn.Linear,
        spec: LossSpec,
        backend: str,
        check_target: bool | None,
    ) -> None:
        self.head = head
        self.spec = spec
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

    Args:
        model: a ``transformers`` causal LM of a family in :data:`SUPPORTED_MODEL_TYPES`, whose
            output layer is a plain ``nn.Linear`` (tied to the embeddings or not).
        label_smoothing: passed to the fused op (the unpatched model has none).
        z_loss: passed to the fused op (the unpatched model has none).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``, as in the fused op.
        check_target: as in the fused op.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: for a model family this patch does not support, or a non-causal loss type.
        TypeError: when the output layer is not an ``nn.Linear`` (e.g. a LoRA-wrapped head).

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
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES or not hasattr(model, "get_output_embeddings"):
        raise ValueError(
            f"patch_causal_lm supports Hugging Face causal LMs of the model types "
            f"{SUPPORTED_MODEL_TYPES}; got {type(model).__name__} (model_type={model_type!r})"
        )
    loss_type = getattr(model, "loss_type", None)
    if loss_type not in (None, "ForCausalLM"):
        raise ValueError(
            f"patch_causal_lm replaces the causal-LM loss, but {type(model).__name__} has "
            f"loss_type={loss_type!r}"
        )
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise TypeError(
            f"patch_causal_lm needs the output layer to be a plain torch.nn.Linear, got "
            f"{type(head).__name__}; a LoRA or otherwise wrapped output layer is not supported"
        )
    patch = _Patch(model, head, spec, backend, check_target)
    setattr(model, _ATTR, patch)
    head.forward = _DeferringHeadForward(patch)
    model.loss_function = functools.partial(_fused_loss, patch)
    model.forward = _ForwardWithFusedLoss(model, patch)
    return model


def unpatch_causal_lm(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_causal_lm` (a no-op on a model that is not patched)."""
    patch: _Patch | None = getattr(model, _ATTR, None)
    if patch is None:
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
    """Whether :func:`patch_causal_lm` patched ``model``."""
    return getattr(model, _ATTR, None) is not None


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

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        patch = self.patch
        if patch.deferring and _in_owning_call(patch):
            patch.hidden = hidden_states
            return None  # the output's logits: never built
        return nn.Linear.forward(patch.head, hidden_states)


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
        if patch.last_stats is not None and not isinstance(output, tuple):
            # an attribute, not a key: code that iterates the output's tensors never sees it
            output.token_stats = patch.last_stats.sum()  # the batch's, as documented
        return output

    def __getstate__(self) -> dict[str, Any]:
        # read again from the model in the copy; a signature's defaults need not pickle
        return {**vars(self), "_signature": None}


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
    if hidden is None or logits is not None:
        raise RuntimeError(
            "the lossplug-patched loss function was called outside a patched forward call; "
            "call the model with labels=... (or unpatch_causal_lm(model) first)"
        )
    head = patch.head
    target = labels if shift_labels is None else shift_labels
    spec = patch.spec.replace(
        ignore_index=ignore_index,
        reduction="mean" if num_items_in_batch is None else "sum",
        shift=shift_labels is None,
    )
    loss, stats = _linear_cross_entropy(
        hidden,
        head.weight,
        target.to(hidden.device),
        spec,
        bias=head.bias,
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
