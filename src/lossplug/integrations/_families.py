"""Which causal LMs the fused loss reproduces exactly, read from what their ``forward`` does.

:func:`~lossplug.integrations.transformers.patch_causal_lm` defers the output layer and computes
the loss where the model's forward calls ``self.loss_function``. That is exact when everything the
forward does to the logits in between is something the fused op does too. This module decides it
for a model class, once, by reading the class's ``forward`` (its syntax tree, never by running it
and never by the family's name), and turns what it finds into a :class:`Fold`:

* nothing (Llama, Mistral, Qwen, Phi, OLMo, GPT-NeoX, Falcon, StarCoder2 … and the language half of
  most vision-language ``ForConditionalGeneration`` classes);
* a constant logit scale or divisor (Cohere's ``logit_scale``, Granite's ``logits_scaling``):
  ``s * (h @ W.T + b) == (s * h) @ W.T + s * b``, so the op gets ``s * h`` (an ``[N, D]`` tensor,
  never a ``[V, D]`` one) and ``s * b``. In fp32 the two sides differ only by where one rounding of
  ``s`` happens (at most an ulp per logit, far below 1e-5);
* soft-capping ``c * tanh(x / c)`` (Gemma 2 and 3), passed to the op's ``softcap``, possibly after
  a scale (``c * tanh(m * x / c)`` is a softcap of the scaled logits). Factors that cancel (Gemma's
  ``/ c`` then ``* c``) cancel exactly, before any rounding;
* ``.float()`` and ``.contiguous()``, which change nothing the fused op sees (it scores in fp32);
* a module of the model applied to the logits whose forward is one ``return`` of such a transform
  of its argument (Inkling 2's ``logit_softcap``).

The output layer may be called through a module whose forward ends by returning its result
(BERT's ``cls``, RoBERTa's ``lm_head``: dense, activation, norm, then the decoder): the deferred
layer's input is then what that module made of the hidden states. A model whose forward has no
output layer call of its own but hands ``labels=labels`` to a causal LM inside it (Kosmos 2.5) is
patched through that model (:func:`language_model_inside`).

In fp32 these are exact to 1e-5 (``benchmarks/families.py`` checks every family); in bf16 the op
applies the transform to fp32 logits where the model applies it to bf16 ones, so the patched loss
is the more accurate of the two. A router auxiliary loss added to the loss afterwards (Mixtral,
Qwen3-MoE, gpt-oss) needs nothing: the forward adds it to the loss the op returned.

Constants are read, when the model is patched, by a small evaluator that follows only attribute
chains from ``self``, names bound earlier in the forward, ``getattr`` with a default and
``get_text_config()``; a condition ``if X is (not) None`` is decided with it (a truth test such as
``if self.training`` is not: it may change after the patch). Anything else between the output
layer and the loss (a write into the logits, a slice, a condition known only at run time, a
helper method) refuses the class, with the line that stops it.

Why the code and not a check at run time: comparing the patched loss with the unpatched one on the
first batch would build the full logits once (the memory the patch exists to save), would decide
on one batch, and could not say *why* a class differs. Reading the forward costs nothing per call,
follows each release of ``transformers`` (new families are accepted without a list to update),
and every refusal names the class, the reason and the line.
"""

from __future__ import annotations

import ast
import inspect
import math
import numbers
import textwrap
from dataclasses import dataclass
from typing import Any

from torch import nn

FALLBACK = (
    "leave the model unpatched so that it returns its logits, and let lossplug.LossMonitor "
    "score them (or call lossplug.cross_entropy on them)"
)

# the ways the forwards in transformers write tanh
_TANH_PATHS = {
    ("torch", "tanh"),
    ("nn", "functional", "tanh"),
    ("torch", "nn", "functional", "tanh"),
}
# methods that leave the values the fused op scores as they are (it scores in fp32)
_NEUTRAL_METHODS = {"float", "contiguous"}
# attributes of the logits that a statement may read without touching their values
_METADATA = {"device", "dtype"}


@dataclass(frozen=True)
class Fold:
    """What a model does to its logits between the output layer and the loss, as the fused op
    does it: the loss is scored on ``softcap * tanh(scale * z / softcap)`` (no ``tanh`` when
    ``softcap`` is ``None``), ``z = h @ W.T + b`` being the output layer's logits.

    Example:
        >>> Fold(scale=0.5, touched=True)
        Fold(scale=0.5, softcap=None, touched=True)
    """

    scale: float = 1.0
    softcap: float | None = None
    #: whether the forward does arithmetic on the logits (a scale of 1.0 from the config
    #: included), which then needs a tensor to run on
    touched: bool = False


class UnsupportedModelError(ValueError):
    """A model whose loss :func:`patch_causal_lm` cannot reproduce exactly; the message names
    the class, why, and the fallback."""


class _Refusal(Exception):
    """Raised inside the reader: why, and the statement that stops it."""

    def __init__(self, why: str, node: ast.AST | None = None) -> None:
        super().__init__(why)
        self.why, self.node = why, node


def refuse(model: nn.Module, why: str) -> UnsupportedModelError:
    """The error for ``model``: its class, ``why``, and the fallback."""
    return UnsupportedModelError(
        f"patch_causal_lm cannot reproduce the loss of {type(model).__name__} exactly: {why}; "
        f"fallback: {FALLBACK}"
    )


def read_fold(model: nn.Module, head: nn.Module) -> Fold:
    """The :class:`Fold` of ``model``, read from its class's ``forward``.

    Args:
        model: the causal LM (a ``...ForCausalLM``, or a ``...ForConditionalGeneration``).
        head: its output layer (what ``get_output_embeddings()`` returns).

    Returns:
        What the forward does to the logits before ``self.loss_function``.

    Raises:
        UnsupportedModelError: the forward does something else, or cannot be read.

    Example:
        >>> from transformers import CohereConfig, CohereForCausalLM
        >>> config = CohereConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
        ...                       num_hidden_layers=1, num_attention_heads=2, logit_scale=0.25)
        >>> model = CohereForCausalLM(config)
        >>> read_fold(model, model.get_output_embeddings())
        Fold(scale=0.25, softcap=None, touched=True)
    """
    try:
        function, lines = _parsed_forward(model)
    except _UNREADABLE as error:
        raise refuse(model, f"the source of its forward cannot be read ({error})") from None
    if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
        raise refuse(model, "its forward is not a plain function")
    try:
        return _Reader(model, head).read(function.body)
    except _Refusal as refusal:
        where = ""
        if refusal.node is not None and hasattr(refusal.node, "lineno"):
            line = lines[refusal.node.lineno - 1].strip()
            where = f" (in {type(model).__name__}.forward: `{line}`)"
        raise refuse(model, refusal.why + where) from None


class _Reader:
    """Walks the statements of a forward from the output layer's call to ``self.loss_function``.

    ``ops`` collects what happens to the logits, as ``("mul", c)``, ``("div", c)``,
    ``("tanh", None)`` and ``("same", None)`` (``.float()``); ``names`` the constants bound on
    the way (``cap = config.softcap``).
    """

    def __init__(self, model: nn.Module, head: nn.Module) -> None:
        self.model, self.head = model, head
        self.names: dict[str, Any] = {}
        self.ops: list[tuple[str, float | None]] = []
        self.logits = ""  # the name the forward gives the logits

    def read(self, body: list[ast.stmt]) -> Fold:
        module = ast.Module(body=body, type_ignores=[])
        # a second call would hand other hidden states to the loss, a second loss score them again
        if sum(self._is_head_call(node) for node in ast.walk(module)) > 1:
            raise _Refusal("its forward calls the output layer more than once")
        if sum(_is_loss_call(node) for node in ast.walk(module)) > 1:
            raise _Refusal("its forward calls self.loss_function more than once")
        for at, statement in enumerate(body):
            if self._calls_head(statement):
                if not any(_calls_loss(later) for later in body[at + 1 :]):
                    raise _Refusal(
                        "its forward does not pass the logits to self.loss_function", statement
                    )
                self._head_statement(statement)
                if not self._statements(body[at + 1 :]):
                    raise _Refusal(
                        "its forward does not pass the logits to self.loss_function", statement
                    )
                return self._fold()
            # a constant bound before the output layer may be read after it
            self._bind(statement)
        raise _Refusal(
            "its forward does not call the output layer itself (the loss may come from a helper "
            "or a wrapped module)"
        )

    # -- statements -----------------------------------------------------------------------------

    def _calls_head(self, node: ast.AST) -> bool:
        return any(self._is_head_call(sub) for sub in ast.walk(node))

    def _is_head_call(self, node: ast.AST) -> bool:
        """A call of the output layer, or of a module whose forward returns the output layer's
        result (BERT's and RoBERTa's ``cls``/``lm_head``: dense, activation, norm, decoder)."""
        if not (isinstance(node, ast.Call) and _dotted(node.func)[:1] == ("self",)):
            return False
        if len(_dotted(node.func)) != 2:
            return False
        called = getattr(self.model, node.func.attr, None)
        return called is self.head or _returns_head(called, self.head, depth=3)

    def _head_statement(self, statement: ast.stmt) -> None:
        if not (
            isinstance(statement, ast.Assign)
            and len(statement.targets) == 1
            and isinstance(statement.targets[0], ast.Name)
        ):
            raise _Refusal("the output layer is called inside a larger statement", statement)
        self.logits = statement.targets[0].id
        self._transform(statement.value, head_call=True)

    def _statements(self, statements: list[ast.stmt]) -> bool:
        """Read ``statements`` up to the loss; whether the loss was reached."""
        for statement in statements:
            if _calls_loss(statement):
                if isinstance(statement, ast.If) and not self._mentions(statement.test):
                    # ``if labels is not None:``: the loss is computed inside
                    if self._statements(statement.body):
                        return True
                    raise _Refusal("the loss is computed in a way not recognised", statement)
                self._loss_call(statement)
                return True
            self._statement(statement)
        return False

    def _statement(self, statement: ast.stmt) -> None:
        if not self._mentions(statement):
            self._bind(statement)  # e.g. ``loss = None``, ``cap = self.config.logits_soft_cap``
            return
        if isinstance(statement, ast.Assign) and _is_name(statement.targets, self.logits):
            self._transform(statement.value)
        elif (
            isinstance(statement, ast.AugAssign)
            and isinstance(statement.target, ast.Name)
            and statement.target.id == self.logits
            and isinstance(statement.op, ast.Mult | ast.Div)
        ):
            kind = "mul" if isinstance(statement.op, ast.Mult) else "div"
            self.ops.append((kind, self._number(statement.value)))
        elif isinstance(statement, ast.If) and _is_none_test(statement.test):
            # only ``X is (not) None`` is decided now: a truth test may read state that changes
            # after the patch (``if self.training``)
            try:
                decided = self._constant(statement.test)
            except _Refusal:
                raise _Refusal(
                    "it changes the logits under a condition known only at run time", statement
                ) from None
            chosen = statement.body if decided else statement.orelse
            if self._statements(chosen):
                raise _Refusal("the loss is computed inside a condition on the config", statement)
        else:
            raise _Refusal("it changes the logits in a way lossplug does not reproduce", statement)

    def _bind(self, statement: ast.stmt) -> None:
        """Remember ``name = <constant>``; other statements that do not touch the logits are
        left alone (a later constant that needs them refuses then)."""
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target = statement.targets[0]
            if isinstance(target, ast.Name):
                try:
                    self.names[target.id] = self._constant(statement.value)
                except _Refusal:
                    self.names.pop(target.id, None)  # no longer the constant it may have been

    def _loss_call(self, statement: ast.stmt) -> None:
        call = next(sub for sub in ast.walk(statement) if _is_loss_call(sub))
        given = call.args[0] if call.args else None
        given = next((k.value for k in call.keywords if k.arg == "logits"), given)
        if not (isinstance(given, ast.Name) and given.id == self.logits):
            raise _Refusal("its loss is not computed on the output layer's logits", statement)
        others = [*call.args[1:], *(k.value for k in call.keywords if k.arg != "logits")]
        if any(self._mentions(other, allowed=_METADATA | {"shape"}) for other in others):
            raise _Refusal("its loss reads the logits' values", statement)
        if any(self._mentions(other) for other in others):
            # ``vocab_size=logits.shape[-1]``, which the fused loss does not need: the logits must
            # be a tensor (the stand-in) for the forward to read it
            self.ops.append(("same", None))

    # -- expressions ----------------------------------------------------------------------------

    def _mentions(self, node: ast.AST, allowed: frozenset[str] | set[str] = _METADATA) -> bool:
        """Whether ``node`` reads or writes the logits (the attributes ``allowed`` aside: by
        default their device and dtype)."""
        skip = {
            id(sub.value)
            for sub in ast.walk(node)
            if isinstance(sub, ast.Attribute) and sub.attr in allowed
        }
        return any(
            isinstance(sub, ast.Name) and sub.id == self.logits and id(sub) not in skip
            for sub in ast.walk(node)
        )

    def _transform(self, node: ast.expr, head_call: bool = False) -> None:
        """Append what ``node`` does to the logits (the output layer's call when ``head_call``)."""
        if head_call and self._is_head_call(node):
            return
        if not head_call and isinstance(node, ast.Name) and node.id == self.logits:
            return
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            logit_side, factor = node.left, node.right
            if not self._carries(logit_side, head_call):
                logit_side, factor = factor, logit_side
            self._transform(logit_side, head_call)
            self.ops.append(("mul", self._number(factor)))
            return
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            self._transform(node.left, head_call)
            self.ops.append(("div", self._number(node.right)))
            return
        if (
            isinstance(node, ast.Call)
            and not node.keywords
            and len(node.args) == 1
            and _dotted(node.func) in _TANH_PATHS
        ):
            self._transform(node.args[0], head_call)
            self.ops.append(("tanh", None))
            return
        if (
            isinstance(node, ast.Call)
            and len(_dotted(node.func)) == 2
            and _dotted(node.func)[0] == "self"
            and len(node.args) == 1
            and not node.keywords
            and isinstance(getattr(self.model, node.func.attr, None), nn.Module)
        ):
            # a module of the model applied to the logits (Inkling 2's ``logit_softcap``)
            self._transform(node.args[0], head_call)
            self.ops.extend(_module_ops(getattr(self.model, node.func.attr), node))
            return
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in _NEUTRAL_METHODS
            and not node.args
            and not node.keywords
        ):
            self._transform(node.func.value, head_call)
            self.ops.append(("same", None))  # no change, but it runs on the stand-in
            return
        raise _Refusal("it changes the logits in a way lossplug does not reproduce", node)

    def _carries(self, node: ast.expr, head_call: bool) -> bool:
        """Whether ``node`` holds the logits (rather than a factor)."""
        if head_call:
            return self._calls_head(node)
        return self._mentions(node)

    def _number(self, node: ast.expr) -> float:
        value = self._constant(node)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _Refusal(
                f"a factor of the logits is not a constant number ({type(value).__name__})", node
            )
        if not (math.isfinite(value) and value != 0):
            raise _Refusal(f"a factor of the logits is {value!r}", node)
        return float(value)

    def _constant(self, node: ast.expr) -> Any:
        """The value of ``node`` when it reads only the model and constants."""
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id == "self":
                return self.model
            if node.id in self.names:
                return self.names[node.id]
        elif isinstance(node, ast.Attribute):
            owner = self._constant(node.value)
            if hasattr(owner, node.attr):
                return getattr(owner, node.attr)
        elif isinstance(node, ast.NamedExpr):
            value = self._constant(node.value)
            self.names[node.target.id] = value
            return value
        elif isinstance(node, ast.Compare) and len(node.ops) == 1:
            left, right = self._constant(node.left), self._constant(node.comparators[0])
            if isinstance(node.ops[0], ast.Is):
                return left is right
            if isinstance(node.ops[0], ast.IsNot):
                return left is not right
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "get_text_config" and not node.args and not node.keywords:
                return self._constant(node.func.value).get_text_config()
        elif (
            isinstance(node, ast.Call)
            and _dotted(node.func) == ("getattr",)
            and len(node.args) in (2, 3)
            and not node.keywords
        ):
            owner, name = self._constant(node.args[0]), self._constant(node.args[1])
            if isinstance(name, str):
                if len(node.args) == 3:
                    return getattr(owner, name, self._constant(node.args[2]))
                if hasattr(owner, name):
                    return getattr(owner, name)
        raise _Refusal("a value it uses on the logits is not a constant of the model", node)

    # -- the result -----------------------------------------------------------------------------

    def _fold(self) -> Fold:
        """``post * tanh(pre * z)`` (or ``pre * z``) as ``softcap * tanh(scale * z / softcap)``.

        Factors are kept with their powers so that Gemma's ``/ c`` before ``tanh`` and ``* c``
        after cancel exactly instead of leaving ``(1 / c) * c`` rounded.
        """
        pre: dict[float, int] = {}
        post: dict[float, int] = {}
        capped = False
        for kind, value in self.ops:
            if kind == "same":
                continue
            if kind == "tanh":
                if capped:
                    raise _Refusal("it applies tanh to the logits twice")
                capped = True
                continue
            side = post if capped else pre
            side[value] = side.get(value, 0) + (1 if kind == "mul" else -1)
        touched = bool(self.ops)
        if not capped:
            return Fold(scale=_product(pre), touched=touched)
        cap = _product(post)
        if not cap > 0:
            raise _Refusal(f"its soft-capping has a factor {cap!r} (the op needs one > 0)")
        merged = dict(pre)
        for value, power in post.items():
            merged[value] = merged.get(value, 0) + power
        return Fold(scale=_product(merged), softcap=cap, touched=touched)


def language_model_inside(model: nn.Module, head: nn.Module) -> nn.Module | None:
    """The causal LM inside ``model`` that its forward hands the labels to, when ``model`` has no
    output layer call of its own (Kosmos 2.5's ``text_model``): a module of ``model`` with the
    same output layer, called as ``self.<name>(..., labels=labels, ...)``. ``None`` otherwise.

    Example:
        >>> language_model_inside(nn.Linear(2, 2), nn.Linear(2, 2)) is None
        True
    """
    function = _forward_of(model)
    if function is None:
        return None
    for node in ast.walk(function):
        if not (isinstance(node, ast.Call) and len(_dotted(node.func)) == 2):
            continue
        if _dotted(node.func)[0] != "self":
            continue
        inner = getattr(model, node.func.attr, None)
        hands_labels = any(
            k.arg == "labels" and isinstance(k.value, ast.Name) and k.value.id == "labels"
            for k in node.keywords
        )
        if (
            hands_labels
            and isinstance(inner, nn.Module)
            and inner is not model
            and hasattr(inner, "get_output_embeddings")
            and inner.get_output_embeddings() is head
        ):
            return inner
    return None


#: what reading the source of a forward may raise
_UNREADABLE = (OSError, TypeError, SyntaxError, IndexError)


def _parsed_forward(module: nn.Module) -> tuple[ast.stmt, list[str]]:
    """The first statement of the source of ``module``'s class's ``forward`` (its definition),
    and the lines of that source; raises one of :data:`_UNREADABLE` when it cannot be read."""
    source = textwrap.dedent(inspect.getsource(type(module).forward))
    return ast.parse(source).body[0], source.splitlines()


def _forward_of(module: nn.Module) -> ast.FunctionDef | None:
    """The syntax tree of ``module``'s class's ``forward`` (``None`` if it cannot be read)."""
    try:
        function, _ = _parsed_forward(module)
    except _UNREADABLE:
        return None
    return function if isinstance(function, ast.FunctionDef) else None


def _returns_head(module: Any, head: nn.Module, depth: int) -> bool:
    """Whether ``module``'s forward returns what ``head`` (one of its modules) computes, called
    once, as its last step: ``x = self.decoder(x); return x`` or ``return self.decoder(x)``."""
    if depth == 0 or not isinstance(module, nn.Module) or module is head:
        return False
    if not any(sub is head for sub in module.modules()):
        return False
    function = _forward_of(module)
    if function is None:
        return False

    def leads(node: ast.AST) -> bool:
        if not (isinstance(node, ast.Call) and len(_dotted(node.func)) == 2):
            return False
        if _dotted(node.func)[0] != "self":
            return False
        called = getattr(module, node.func.attr, None)
        return called is head or _returns_head(called, head, depth - 1)

    calls = [node for node in ast.walk(function) if leads(node)]
    body = function.body
    if len(calls) != 1 or not body or not isinstance(body[-1], ast.Return):
        return False
    returned = body[-1].value
    if returned is calls[0]:
        return True
    before = body[-2] if len(body) > 1 else None
    return (
        isinstance(returned, ast.Name)
        and isinstance(before, ast.Assign)
        and _is_name(before.targets, returned.id)
        and before.value is calls[0]
    )


def _module_ops(module: nn.Module, node: ast.AST) -> list[tuple[str, float | None]]:
    """What ``module`` does to the logits, when its forward is one ``return`` of a transform of
    its one argument (``return torch.tanh(x / self.softcap) * self.softcap``)."""
    function = _forward_of(module)
    body = [] if function is None else [s for s in function.body if not _is_docstring(s)]
    params = [] if function is None else function.args.args[1:]
    if len(body) != 1 or not isinstance(body[0], ast.Return) or len(params) != 1:
        raise _Refusal(f"it applies the module {type(module).__name__} to the logits", node)
    reader = _Reader(module, head=_NO_HEAD)
    reader.logits = params[0].arg
    try:
        reader._transform(body[0].value)
    except _Refusal as refusal:
        raise _Refusal(
            f"it applies the module {type(module).__name__} to the logits ({refusal.why})", node
        ) from None
    return reader.ops


def _is_docstring(statement: ast.stmt) -> bool:
    return isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)


#: a head no module is, for the reader of a module applied to the logits
_NO_HEAD = nn.Identity()


def _product(factors: dict[float, int]) -> float:
    result = 1.0
    for value, power in factors.items():
        result *= value**power if power else 1.0
    return result


def _dotted(node: ast.expr) -> tuple[str, ...]:
    """``torch.nn.functional.tanh`` as ``("torch", "nn", "functional", "tanh")``; ``()`` for
    anything that is not a dotted name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ()
    return (node.id, *reversed(parts))


def _is_name(targets: list[ast.expr], name: str) -> bool:
    return len(targets) == 1 and isinstance(targets[0], ast.Name) and targets[0].id == name


def _is_none_test(node: ast.expr) -> bool:
    return (
        isinstance(node, ast.Compare)
        and len(node.ops) == 1
        and isinstance(node.ops[0], ast.Is | ast.IsNot)
        and isinstance(node.comparators[0], ast.Constant)
        and node.comparators[0].value is None
    )


def _is_loss_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and _dotted(node.func) == ("self", "loss_function")


def _calls_loss(node: ast.AST) -> bool:
    return any(_is_loss_call(sub) for sub in ast.walk(node))
