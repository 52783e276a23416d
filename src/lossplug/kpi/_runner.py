"""Run KPIs safely: schedule, timeout, errors, non-finite values, targets; no framework needed."""

from __future__ import annotations

import math
import numbers
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lossplug.kpi._core import KPI, KPIContext, KPIResult

Broadcast = Callable[[Any], Any]


class KPIError(RuntimeError):
    """A KPI with ``on_error="raise"`` failed or timed out."""


@dataclass
class KPIState:
    """What survives a resume for one KPI."""

    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    nonfinite: int = 0
    best: float | None = None
    reached_at_step: int | None = None
    last_step: int = -1


@dataclass
class KPIOutcome:
    """One call's result: what to log, the sample rows, and how the call went."""

    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] | None = None
    status: str = "ok"  # ok | error | timeout | busy | nothing
    error: str | None = None


class KPIRunner:
    """Runs :class:`~lossplug.KPI` objects for any training loop (plain PyTorch, Fabric, Lightning).

    A KPI never stops training unless it asks to (``on_error="raise"``): an exception is caught,
    counted and warned once with its traceback; a call past ``timeout_s`` is abandoned (its
    thread is left to finish in the background and the KPI is skipped while it does); NaN and
    infinite values are counted and not logged. Under DDP, KPIs with ``rank_zero_only`` run on
    rank 0 and their outcome is broadcast, so every rank logs and branches the same way.

    Example:
        >>> from lossplug.kpi import KPI, KPIContext, KPIRunner
        >>> runner = KPIRunner([KPI("answer", lambda ctx: 42.0, every_n_steps=10)])
        >>> [k.name for k in runner.due("train_step", step=10, epoch=0)]
        ['answer']
        >>> runner.run(runner.kpis[0], KPIContext(step=10)).metrics["kpi/answer"]
        42.0
    """

    def __init__(self, kpis: Sequence[KPI] | KPI) -> None:
        if isinstance(kpis, KPI):
            kpis = [kpis]
        kpis = list(kpis)
        for item in kpis:
            if not isinstance(item, KPI):
                raise TypeError(
                    f"kpis must be KPI objects (use lossplug.KPI or @lossplug.kpi), got {item!r}"
                )
        names = [item.name for item in kpis]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"KPI names must be unique, repeated: {duplicates}")
        self.kpis = kpis
        self.states = {item.name: KPIState() for item in kpis}
        self._running: dict[str, threading.Thread] = {}
        self._warned: set[str] = set()

    def due(self, event: str, *, step: int, epoch: int) -> list[KPI]:
        """The KPIs to run now; a KPI never runs twice at the same step of the same event kind."""
        due = []
        for item in self.kpis:
            if not item.is_due(event, step=step, epoch=epoch):
                continue
            if event == "train_step" and step <= self.states[item.name].last_step:
                continue  # already ran at this step (e.g. before a resume)
            due.append(item)
        return due

    def run(
        self,
        kpi: KPI,
        ctx: KPIContext,
        *,
        is_rank_zero: bool = True,
        broadcast: Broadcast | None = None,
    ) -> KPIOutcome:
        """Call ``kpi`` (on rank 0 only when it says so), share the outcome, update its state."""
        payload = None
        if is_rank_zero or not kpi.rank_zero_only:
            payload = self._call(kpi, ctx)
        if broadcast is not None and kpi.rank_zero_only:
            payload = broadcast(payload)
        outcome = self._record(kpi, ctx.step, payload)
        if kpi.on_error == "raise" and outcome.status in ("error", "timeout"):
            raise KPIError(f"KPI {kpi.name!r} failed at step {ctx.step}: {outcome.error}")
        return outcome

    # ------------------------------------------------------------------------------ internals
    def _call(self, kpi: KPI, ctx: KPIContext) -> dict[str, Any]:
        """Run the user function; return a picklable payload (it may cross processes)."""
        previous = self._running.get(kpi.name)
        if previous is not None and previous.is_alive():
            return {"status": "busy", "error": "the previous call is still running", "seconds": 0.0}
        model = ctx.model if kpi.uses_model else None
        was_training = bool(model is not None and model.training)
        if model is not None:
            model.eval()
        started = time.perf_counter()
        try:
            if kpi.timeout_s is None:
                try:
                    with torch.no_grad():
                        returned = kpi.fn(ctx)
                except Exception as exc:  # a KPI must never stop training
                    return self._failure(kpi, exc, time.perf_counter() - started)
            else:
                box: dict[str, Any] = {}

                def target() -> None:
                    try:
                        with torch.no_grad():  # grad mode is per thread
                            box["returned"] = kpi.fn(ctx)
                    except BaseException as exc:  # reported in the main thread
                        box["exc"] = exc

                thread = threading.Thread(target=target, name=f"kpi-{kpi.name}", daemon=True)
                thread.start()
                thread.join(kpi.timeout_s)
                if thread.is_alive():
                    self._running[kpi.name] = thread
                    return {
                        "status": "timeout",
                        "error": f"abandoned after timeout_s={kpi.timeout_s:g}",
                        "seconds": time.perf_counter() - started,
                    }
                if "exc" in box:
                    return self._failure(kpi, box["exc"], time.perf_counter() - started)
                returned = box.get("returned")
        finally:
            if model is not None and was_training:
                model.train()
        seconds = time.perf_counter() - started
        try:
            values, samples = _normalise(kpi, returned)
        except (TypeError, ValueError) as exc:
            return self._failure(kpi, exc, seconds)
        return {"status": "ok", "values": values, "samples": samples, "seconds": seconds}

    def _failure(self, kpi: KPI, exc: BaseException, seconds: float) -> dict[str, Any]:
        if kpi.name not in self._warned:
            self._warned.add(kpi.name)
            trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            then = (
                "the run stops (on_error='raise')"
                if kpi.on_error == "raise"
                else f"training goes on and errors are counted in {kpi.key}/errors"
            )
            warnings.warn(
                f"KPI {kpi.name!r} raised {type(exc).__name__}: {exc}; {then}\n{trace}",
                RuntimeWarning,
                stacklevel=4,
            )
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}", "seconds": seconds}

    def _record(self, kpi: KPI, step: int, payload: dict[str, Any] | None) -> KPIOutcome:
        state = self.states[kpi.name]
        if payload is None:  # a rank that did not run a per-rank KPI
            return KPIOutcome(status="nothing")
        state.calls += 1
        state.last_step = max(state.last_step, step)
        status = payload["status"]
        metrics: dict[str, float] = {f"{kpi.key}/seconds": float(payload.get("seconds", 0.0))}
        outcome = KPIOutcome(metrics=metrics, status=status, error=payload.get("error"))
        if status == "error":
            state.errors += 1
            metrics[f"{kpi.key}/errors"] = float(state.errors)
            return outcome
        if status in ("timeout", "busy"):
            state.timeouts += 1
            metrics[f"{kpi.key}/timeouts"] = float(state.timeouts)
            return outcome
        values: dict[str, float] = payload["values"]
        finite = {key: value for key, value in values.items() if math.isfinite(value)}
        if len(finite) < len(values):
            state.nonfinite += len(values) - len(finite)
            metrics[f"{kpi.key}/nonfinite"] = float(state.nonfinite)
            bad = {key: value for key, value in values.items() if key not in finite}
            if f"{kpi.name}/nonfinite" not in self._warned:
                self._warned.add(f"{kpi.name}/nonfinite")
                warnings.warn(
                    f"KPI {kpi.name!r} returned non-finite values {bad} at step {step}: "
                    "they are counted, not logged",
                    RuntimeWarning,
                    stacklevel=3,
                )
        metrics.update(finite)
        outcome.samples = payload.get("samples")
        if kpi.primary is not None:
            primary = values.get(f"{kpi.key}/{kpi.primary}")
        else:
            primary = next(iter(values.values()), None)
        if primary is not None and math.isfinite(primary):
            if kpi.better(primary, state.best):
                state.best = primary
            if state.reached_at_step is None and kpi.reached(primary):
                state.reached_at_step = step
                metrics[f"{kpi.key}/reached_at_step"] = float(step)
        if not values:
            outcome.status = "nothing"
        return outcome

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "states": {name: asdict(s) for name, s in self.states.items()},
            "kpis": {item.name: item.state_dict() for item in self.kpis},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, saved in state.get("states", {}).items():
            if name in self.states:
                self.states[name] = KPIState(**saved)
        for item in self.kpis:
            saved = state.get("kpis", {}).get(item.name)
            if saved:
                item.load_state_dict(saved)


def _to_float(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"KPI {name!r} returned a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"KPI {name!r} returned {type(value).__name__} {value!r}, not a number")
    return float(value)


def _normalise(kpi: KPI, returned: Any) -> tuple[dict[str, float], list[dict[str, Any]] | None]:
    samples = None
    if isinstance(returned, KPIResult):
        samples = [dict(row) for row in returned.samples] if returned.samples else None
        returned = returned.value
    if returned is None:
        return {}, samples
    if isinstance(returned, Mapping):
        values = {f"{kpi.key}/{sub}": _to_float(kpi.name, v) for sub, v in returned.items()}
        return values, samples
    return {kpi.key: _to_float(kpi.name, returned)}, samples
