"""What a KPI is: a user function, its schedule, and what it may return."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

EVENTS = ("train_step", "validation_end", "train_epoch_end", "train_end")
ON_ERROR = ("log", "raise")
# A KPI's default time limit. Long enough for what KPIs usually do (generate from a few prompts
# with a large model, score a small benchmark), short enough that a call that hangs costs a run
# five minutes once: a late call is stopped at its next call into the model.
DEFAULT_TIMEOUT_S = 300.0


@dataclass
class KPIContext:
    """What a KPI function gets: where training is, the model, and the latest logged metrics.

    Attributes:
        step: the optimizer step (the logging x-axis).
        epoch: the current epoch.
        event: what triggered the call (``"train_step"``, ``"validation_end"``…).
        model: the model being trained, in eval mode and under ``torch.no_grad()`` during the
            call. Under ``KPIMonitor`` it is your ``LightningModule`` itself (not the DDP or FSDP
            wrapper Lightning trains through, and not a Hugging Face model your module holds:
            reach that through your module's attribute, e.g. ``ctx.model.model``); in your own
            loop, whatever you put in the context.
        metrics: the latest logged metrics by key (``"val/perplexity"``…), as floats. A key the
            KPI looks up that is still not logged once the logged names are known (after the
            first validation) is warned about once, with the closest logged names.
        device: the model's device.
        elapsed_s: wall-clock seconds since training started (what the run costs).
        tokens: tokens scored so far (``train/tokens`` when LossMonitor logs it), else ``None``.
        samples: training samples seen so far on all ranks, when known.
        world_size: number of processes training.
        trainer: the Lightning ``Trainer`` when there is one, else ``None``.
        training_s: seconds of training since it started: ``elapsed_s`` less the time spent
            in evaluation and in KPIs (what a rate should divide by), when a monitor knows it.
    """

    step: int
    epoch: int = 0
    event: str = "train_step"
    model: torch.nn.Module | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    elapsed_s: float = 0.0
    tokens: int | None = None
    samples: int | None = None
    world_size: int = 1
    trainer: Any = None
    training_s: float | None = None


@dataclass
class KPIResult:
    """A KPI value (a number or a mapping of names to numbers) with optional sample rows.

    ``samples`` are dicts with the same keys, logged as a table (a W&B table when W&B logs).
    """

    value: float | Mapping[str, float]
    samples: Sequence[Mapping[str, Any]] | None = None


KPIFunction = Callable[[KPIContext], "float | Mapping[str, float] | KPIResult | None"]


class KPI:
    """A business KPI: a user function run on a schedule, safely, logged as ``kpi/<name>``.

    Args:
        name: the key under ``kpi/``: parts joined by ``/``, each of letters, digits, ``_``,
            ``-`` and ``.``, none empty, ``.``, ``..`` or ending in ``.`` (the name also names
            folders and files of the W&B run, e.g. its sample tables).
        fn: ``fn(ctx: KPIContext)`` returning a number, a mapping of names to numbers (logged as
            ``kpi/<name>/<sub>``), a :class:`KPIResult` with sample rows, or ``None`` (nothing).
        every_n_steps: run after every this many optimizer steps.
        every_n_epochs: run at the end of every this many training epochs.
        at: lifecycle events to run at, among ``"validation_end"``, ``"train_epoch_end"``,
            ``"train_end"``, ``"train_step"``. Default: ``("validation_end",)`` when no
            ``every_n_*`` is given, else none.
        higher_is_better: direction of the value (W&B summary ``max`` or ``min``, targets, best).
        timeout_s: stop a call that runs longer, at its next call into the model (any module's
            forward, every step of ``generate`` included): it is counted in
            ``kpi/<name>/timeouts`` and training resumes once it has stopped (within
            ``KPIRunner.stop_grace_s``; a call that never calls the model cannot be stopped, is
            warned about loudly and skipped while it runs). The default,
            ``DEFAULT_TIMEOUT_S`` = 300 s, fits generating from a few prompts with a large model
            and caps what a hang costs the run. The function then runs on a worker thread,
            whose thread-local state is its own (``no_grad`` is set for it; its CUDA current
            device is the default one, so place tensors on ``ctx.device``). ``None`` runs it
            inline on the training thread with no limit: a hang then hangs training.
        on_error: ``"log"`` (count, warn once with the traceback, go on) or ``"raise"``.
        target: when the value first reaches it, ``kpi/<name>/reached_at_step`` is logged once.
        rank_zero_only: under DDP, run on rank 0 only and broadcast the result to every rank.
        primary: for a KPI returning a mapping, the entry that ``target`` and the best value
            follow (default: the first entry).
        uses_model: put the model in eval mode for the call (``False`` for KPIs that do not
            touch it, which saves two passes over its modules).
        cumulative: values that are running totals (the cost so far, tokens seen so far):
            ``True`` for all of the KPI's values, or the sub-names of the mapping entries that
            are (e.g. ``("total",)``). They are summarised by their last value (W&B summary
            ``last``), never by a best one, and have no best value or ``target``.
        outcome: whether the value measures what the model produces (pass rate, speed-up of
            its code, a judge's score), so that its link with perplexity means something; the
            built-ins that measure the run itself (throughput, cost, time to a target) say
            ``False``, and ``lossplug report`` links them only when asked (``--link KEY``).
        unit: the unit of the value (``"USD"``, ``"s"``), shown on the report's axes.

    Example:
        >>> from lossplug import KPI
        >>> double_step = KPI("double_step", lambda ctx: 2 * ctx.step, every_n_steps=5)
        >>> double_step.is_due("train_step", step=10, epoch=0)
        True
    """

    def __init__(
        self,
        name: str,
        fn: KPIFunction,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        at: Sequence[str] | None = None,
        higher_is_better: bool = True,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        on_error: str = "log",
        target: float | None = None,
        rank_zero_only: bool = True,
        primary: str | None = None,
        uses_model: bool = True,
        cumulative: bool | Collection[str] = False,
        outcome: bool = True,
        unit: str | None = None,
    ) -> None:
        check_name(name)
        if not callable(fn):
            raise TypeError(f"fn must be callable(ctx), got {fn!r}")
        for arg, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{arg} must be None or an int >= 1, got {value!r}")
        if at is None:
            at = () if (every_n_steps or every_n_epochs) else ("validation_end",)
        if isinstance(at, str):
            at = (at,)
        if not isinstance(at, Iterable):
            raise TypeError(f"at must be an event name or a sequence of them, got {at!r}")
        at = tuple(at)
        unknown = [event for event in at if event not in EVENTS]
        if unknown:
            raise ValueError(f"at must contain only {EVENTS}, got {tuple(at)!r}")
        if not (every_n_steps or every_n_epochs or at):
            raise ValueError(
                f"KPI {name!r} would never run: give every_n_steps, every_n_epochs or at"
            )
        if timeout_s is not None and (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, (int, float))
            or not 0 < timeout_s < math.inf
        ):
            raise ValueError(f"timeout_s must be None or a finite number > 0, got {timeout_s!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if target is not None and (
            isinstance(target, bool) or not isinstance(target, (int, float)) or math.isnan(target)
        ):
            raise ValueError(f"target must be None or a number, got {target!r}")
        for arg, value in (
            ("higher_is_better", higher_is_better),
            ("rank_zero_only", rank_zero_only),
            ("uses_model", uses_model),
            ("outcome", outcome),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{arg} must be True or False, got {value!r}")
        if primary is not None and not isinstance(primary, str):
            raise TypeError(f"primary must be None or a str, got {primary!r}")
        if primary == "":
            raise ValueError("primary must name an entry of the KPI's mapping, got ''")
        if unit is not None and not isinstance(unit, str):
            raise TypeError(f"unit must be None or a str, got {unit!r}")
        cumulative = _check_cumulative(cumulative)
        if target is not None and cumulative is True:
            raise ValueError(
                f"target={target!r} is meaningless for KPI {name!r}: its values are cumulative "
                "totals (cumulative=True), which have no best value or target"
            )
        if target is not None and cumulative:
            if primary is None:
                raise ValueError(
                    f"KPI {name!r} has a target and cumulative entries {sorted(cumulative)}: "
                    "give primary=<the entry the target is for>"
                )
            if primary in cumulative:
                raise ValueError(
                    f"target={target!r} is meaningless for KPI {name!r}: its primary entry "
                    f"{primary!r} is cumulative, and totals have no best value or target"
                )
        self.name = name
        self.fn = fn
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.at = tuple(at)
        self.higher_is_better = bool(higher_is_better)
        self.timeout_s = None if timeout_s is None else float(timeout_s)
        self.on_error = on_error
        self.target = None if target is None else float(target)
        self.rank_zero_only = bool(rank_zero_only)
        self.primary = primary
        self.uses_model = bool(uses_model)
        self.cumulative: bool | frozenset[str] = cumulative
        self.outcome = outcome
        self.unit = unit

    @property
    def key(self) -> str:
        return f"kpi/{self.name}"

    def describe(self) -> dict[str, Any]:
        """What a report needs to know of this KPI, as plain data for the run's config.

        Example:
            >>> KPI("pass_rate", len, target=0.8).describe()["target"]
            0.8
        """
        cumulative = self.cumulative
        return {
            "higher_is_better": self.higher_is_better,
            "target": self.target,
            "primary": self.primary,
            "cumulative": cumulative if isinstance(cumulative, bool) else sorted(cumulative),
            "outcome": self.outcome,
            "unit": self.unit,
        }

    def is_cumulative(self, key: str) -> bool:
        """Whether the logged value ``key`` (``kpi/<name>`` or ``kpi/<name>/<sub>``) is a total."""
        if self.cumulative is True:
            return key == self.key or key.startswith(self.key + "/")
        if not self.cumulative or not key.startswith(self.key + "/"):
            return False
        return key[len(self.key) + 1 :] in self.cumulative

    def is_due(self, event: str, *, step: int, epoch: int) -> bool:
        """Whether the schedule asks for a call at ``event`` (``epoch`` counts from 0)."""
        if event in self.at:
            return True
        if event == "train_step" and self.every_n_steps:
            return step > 0 and step % self.every_n_steps == 0
        if event == "train_epoch_end" and self.every_n_epochs:
            return (epoch + 1) % self.every_n_epochs == 0
        return False

    def reached(self, value: float) -> bool:
        """Whether ``value`` meets the target."""
        if self.target is None:
            return False
        return value >= self.target if self.higher_is_better else value <= self.target

    def state_dict(self) -> dict[str, Any]:
        """State of a stateful KPI (built-ins override this) that must survive a resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best

    def __repr__(self) -> str:
        schedule = []
        if self.every_n_steps:
            schedule.append(f"every_n_steps={self.every_n_steps}")
        if self.every_n_epochs:
            schedule.append(f"every_n_epochs={self.every_n_epochs}")
        if self.at:
            schedule.append(f"at={self.at}")
        return f"KPI({self.name!r}, {', '.join(schedule)})"


def check_name(name: object) -> None:
    """Raise unless ``name`` can be a KPI name (see :class:`KPI`)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__} {name!r}")
    parts = name.split("/")
    if not name or not all(_good_part(part) for part in parts):
        raise ValueError(
            "name must be parts joined by '/', each of letters, digits, '_', '-', '.' and none "
            f"empty, '.', '..' or ending in '.' (it also names files of the W&B run); got {name!r}"
        )


def _good_part(part: str) -> bool:
    # "." and ".." would climb out of the run's media folder; a trailing "." is dropped by
    # Windows file systems, so two names could share one folder
    if not part or part in (".", "..") or part.endswith("."):
        return False
    return all(ch.isalnum() or ch in "_-." for ch in part)


def _check_cumulative(cumulative: object) -> bool | frozenset[str]:
    if isinstance(cumulative, bool):
        return cumulative
    if isinstance(cumulative, str) or not isinstance(cumulative, Collection):
        raise TypeError(
            "cumulative must be True, False or a collection of entry names such as "
            f"('total',), got {cumulative!r}"
        )
    names = frozenset(cumulative)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"cumulative must name at least one entry, each a non-empty str, got {cumulative!r}"
        )
    return names


def kpi(name: str | None = None, **options: Any) -> Callable[[KPIFunction], KPI]:
    """Decorator: turn ``fn(ctx)`` into a :class:`KPI` named after the function.

    Example:
        >>> import lossplug
        >>> @lossplug.kpi(every_n_steps=100, higher_is_better=False)
        ... def dollars_per_step(ctx):
        ...     return 0.01 * ctx.step
        >>> dollars_per_step.key
        'kpi/dollars_per_step'
    """
    if callable(name):  # used bare: @kpi
        return KPI(name.__name__, name)
    if name is not None and not isinstance(name, str):
        raise TypeError(
            f"kpi() takes the KPI's name as its only positional argument, got {name!r}: "
            "pass the options by keyword, e.g. @lossplug.kpi(every_n_steps=100)"
        )

    def wrap(fn: KPIFunction) -> KPI:
        return KPI(name or fn.__name__, fn, **options)

    return wrap
