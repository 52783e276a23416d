"""Run KPIs safely: schedule, timeout, errors, non-finite values, targets; no framework needed."""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lossplug.kpi._core import KPI, KPIContext, KPIResult
from lossplug.kpi._isolation import STOP_GRACE_S, KPIThread, isolated

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
    table_errors: int = 0
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

    A KPI never changes the run it measures: the random streams training draws from (Python's
    ``random``, NumPy's global one, torch's CPU and CUDA generators) and every module's own
    ``training`` flag are put back once the call has ended, so that training goes on exactly as
    if the KPI had not run, whatever it sampled, reseeded or switched to eval mode.

    A KPI never stops training unless it asks to (``on_error="raise"``): an exception, even
    ``SystemExit``, is caught, counted and warned once with its traceback (``KeyboardInterrupt``
    alone goes through: the user asked to stop); a call past ``timeout_s`` is stopped at its
    next call into the model (any module's forward, every step of ``generate`` included) and
    training resumes once it has stopped, within ``stop_grace_s``; a call that still runs after
    that (one that never calls the model) is warned about loudly, left running in the background
    and the KPI is skipped while it does; NaN and infinite values are counted and not logged;
    sample rows that cannot be logged are counted in ``kpi/<name>/table_errors`` while the
    values still are. Under DDP, KPIs with ``rank_zero_only`` run on rank 0 and their outcome is
    broadcast, so every rank logs and branches the same way. Keys a KPI looks up in
    ``ctx.metrics`` and does not find are kept, so that :meth:`warn_missing_metrics` can name
    them once the logged names are known.

    Args:
        kpis: the KPIs to run: a list of :class:`~lossplug.KPI` (or a single one).
        stop_grace_s: how long training waits for a call past its ``timeout_s`` to stop (at its
            next call into the model) before it warns and goes on; the ``stop_grace_s``
            attribute may be changed later. Default: ``STOP_GRACE_S`` = 10 s.

    Raises:
        TypeError: ``kpis`` is not a list of KPIs.
        ValueError: two KPIs share a name, or ``stop_grace_s`` is not a finite number >= 0.

    Example:
        >>> from lossplug.kpi import KPI, KPIContext, KPIRunner
        >>> runner = KPIRunner([KPI("answer", lambda ctx: 42.0, every_n_steps=10)])
        >>> [k.name for k in runner.due("train_step", step=10, epoch=0)]
        ['answer']
        >>> runner.run(runner.kpis[0], KPIContext(step=10)).metrics["kpi/answer"]
        42.0
    """

    def __init__(self, kpis: Sequence[KPI] | KPI, *, stop_grace_s: float = STOP_GRACE_S) -> None:
        if (
            isinstance(stop_grace_s, bool)
            or not isinstance(stop_grace_s, (int, float))
            or not 0 <= stop_grace_s < math.inf
        ):
            raise ValueError(f"stop_grace_s must be a finite number >= 0, got {stop_grace_s!r}")
        if isinstance(kpis, KPI):
            kpis = [kpis]
        if isinstance(kpis, (str, bytes, Mapping)) or not isinstance(kpis, Iterable):
            raise TypeError(
                f"kpis must be a list of KPI objects (lossplug.KPI or @lossplug.kpi), got "
                f"{kpis!r}{_hint(kpis)}"
            )
        kpis = list(kpis)
        for item in kpis:
            if not isinstance(item, KPI):
                raise TypeError(
                    f"kpis must hold only KPI objects (lossplug.KPI or @lossplug.kpi), got "
                    f"{item!r}{_hint(item)}"
                )
        names = [item.name for item in kpis]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"KPI names must be unique, repeated: {duplicates}")
        self.kpis = kpis
        self.states = {item.name: KPIState() for item in kpis}
        self.stop_grace_s = float(stop_grace_s)
        # calls past their timeout that could not be stopped, while they run
        self._running: dict[str, KPIThread] = {}
        self._warned: set[str] = set()
        # metric keys each KPI looked up and did not find; calls left running may still add some
        # (set.add and set.copy are single steps under the GIL, and a lock would not pickle for
        # ddp_spawn)
        self._lookups_missed: dict[str, set[str]] = {item.name: set() for item in kpis}
        self._warned_missing: set[tuple[str, str]] = set()

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

    def record_table_error(self, kpi: KPI, exc: BaseException, *, step: int) -> dict[str, float]:
        """Count a failure to log ``kpi``'s sample rows; return the counter to log.

        The KPI's values are not affected: only its table is lost. Warned once per KPI, with the
        traceback; never raises, whatever ``on_error`` says, since the KPI itself succeeded.
        """
        return self._table_failure(kpi, step, f"{type(exc).__name__}: {exc}", exc)

    def warn_missing_metrics(self, known: Iterable[str], *, when: str = "") -> dict[str, list[str]]:
        """Warn about metric keys KPIs looked up in ``ctx.metrics`` that are not in ``known``.

        Call it once the names of the logged metrics are known (after the first validation, for
        a Lightning run), and again later if you like: each KPI is warned once per missing key,
        with the closest known names, since a typo (``"val/perplexty"``) otherwise makes a KPI
        such as ``TimeToTarget`` silently never fire.

        Args:
            known: every metric key logged so far.
            when: words saying when, for the message (e.g. ``"after the first validation"``).

        Returns:
            The newly warned keys, by KPI name.
        """
        known = sorted({key for key in known if isinstance(key, str)})
        warned: dict[str, list[str]] = {}
        for item in self.kpis:
            missed = self._lookups_missed[item.name].copy()
            new = sorted(
                key for key in missed - set(known) if (item.name, key) not in self._warned_missing
            )
            if not new:
                continue
            self._warned_missing.update((item.name, key) for key in new)
            warned[item.name] = new
            lines = []
            for key in new:
                close = difflib.get_close_matches(key, known, n=3)
                hint = f"closest logged: {', '.join(map(repr, close))}" if close else "none close"
                lines.append(f"{key!r} ({hint})")
            when_text = f" {when}" if when else ""
            warnings.warn(
                f"KPI {item.name!r} reads metric {'; '.join(lines)}, which is not logged"
                f"{when_text}: it gets nothing until that key is logged; check its spelling",
                RuntimeWarning,
                stacklevel=2,
            )
        return warned

    # ------------------------------------------------------------------------------ internals
    def _call(self, kpi: KPI, ctx: KPIContext) -> dict[str, Any]:
        """Run the user function; return a picklable payload (it may cross processes)."""
        previous = self._running.get(kpi.name)
        if previous is not None and previous.is_alive():
            return {"status": "busy", "error": "the previous call is still running", "seconds": 0.0}
        self._running.pop(kpi.name, None)
        if isinstance(ctx.metrics, Mapping):
            watched = _WatchedMetrics(ctx.metrics, self._lookups_missed[kpi.name])
            ctx = dataclasses.replace(ctx, metrics=watched)
        started = time.perf_counter()
        # the random streams and module modes come back once the call has ended, or can no
        # longer reach the model: training then goes on as if the KPI never ran
        with isolated(ctx.model if kpi.uses_model else None):
            if kpi.timeout_s is None:
                try:
                    with torch.no_grad():
                        returned = kpi.fn(ctx)
                except (Exception, SystemExit) as exc:  # a KPI must never stop training
                    return self._failure(kpi, exc, time.perf_counter() - started)
            else:
                call = self._call_on_thread(kpi, ctx)
                if call.cancelled:  # even if it ended just then: it ran past its time
                    return self._timed_out(kpi, ctx, call, started)
                if isinstance(call.error, KeyboardInterrupt):
                    raise call.error  # the user asked to stop, here as on the main thread
                if call.error is not None:
                    return self._failure(kpi, call.error, time.perf_counter() - started)
                returned = call.returned
        seconds = time.perf_counter() - started
        try:
            values = _values(kpi, returned)
        except Exception as exc:  # e.g. a tensor whose .item() fails
            return self._failure(kpi, exc, seconds)
        payload = {"status": "ok", "values": values, "samples": None, "seconds": seconds}
        if isinstance(returned, KPIResult):
            try:
                payload["samples"] = _rows(returned.samples)
            except Exception as exc:  # bad rows lose the table, never the values
                payload["samples_error"] = f"{type(exc).__name__}: {exc}"
        return payload

    def _call_on_thread(self, kpi: KPI, ctx: KPIContext) -> KPIThread:
        """Start the call on a worker thread and wait ``timeout_s`` for it; stop it if it is late.

        On return the call has ended, or it was cancelled and is still alive after the grace.
        """

        def call() -> Any:
            with torch.no_grad():  # grad mode is per thread
                return kpi.fn(ctx)

        thread = KPIThread(call, name=f"kpi-{kpi.name}")
        try:
            if not thread.wait(kpi.timeout_s):
                thread.stop(self.stop_grace_s)
        except BaseException:
            # interrupted while waiting (Ctrl+C): the call must not go on using the model while
            # the run shuts down, nor be inside torch when the interpreter exits
            thread.stop(self.stop_grace_s)
            raise
        return thread

    def _timed_out(
        self, kpi: KPI, ctx: KPIContext, call: KPIThread, started: float
    ) -> dict[str, Any]:
        """The payload of a call past ``timeout_s``; warn once (loudly if it still runs)."""
        timeout = f"timeout_s={kpi.timeout_s:g}"
        stopped = call.stopped
        if call.held:
            error = f"stopped after {timeout}; held for good: it caught its KPICancelled"
            self._running[kpi.name] = call  # never run again
        elif stopped:
            error = f"stopped after {timeout}"
        else:
            error = f"still running {self.stop_grace_s:g} s after {timeout}: it is left running"
            self._running[kpi.name] = call  # skipped while it runs
        ran_past = f"KPI {kpi.name!r} ran past {timeout} at step {ctx.step}"
        counted = f"timeouts are counted in {kpi.key}/timeouts"
        if call.held and f"{kpi.name}/held" not in self._warned:
            self._warned.update((f"{kpi.name}/held", f"{kpi.name}/timeout"))
            warnings.warn(
                f"{ran_past} and was stopped at its next call into the model, which it caught "
                "(KPICancelled, a BaseException) and went on to call the model again: it is held "
                "there for good, training goes on as if it had not run, and the KPI is skipped "
                f"from now on; {counted}. Let KPICancelled through (catch Exception, not "
                "BaseException) and give it a larger timeout_s if it needs longer",
                RuntimeWarning,
                stacklevel=5,
            )
        elif stopped and f"{kpi.name}/timeout" not in self._warned:
            # said once: a slow but sound KPI needs a longer timeout_s
            self._warned.add(f"{kpi.name}/timeout")
            warnings.warn(
                f"{ran_past} and was stopped at its next call into the model: training goes on "
                f"as if it had not run, {counted}; give it a larger timeout_s if it needs longer",
                RuntimeWarning,
                stacklevel=5,
            )
        elif not stopped and f"{kpi.name}/unstoppable" not in self._warned:
            self._warned.update((f"{kpi.name}/unstoppable", f"{kpi.name}/timeout"))
            warnings.warn(
                f"{ran_past} and could not be stopped: a late KPI call is stopped at its next "
                f"call into the model, and this one made none within {self.stop_grace_s:g} s. "
                "THE RUN MAY BE PERTURBED: the call goes on in the background, where it uses CPU "
                "time and can still change the objects it holds (tensors of the model included) "
                "and draw from the random streams training uses, though any model call of its "
                "raises. Training goes on with its random streams and model modes "
                f"restored, the KPI is skipped while the call runs and {counted}; give it a "
                "larger timeout_s if it needs longer, and make it end or call the model",
                RuntimeWarning,
                stacklevel=5,
            )
        return {"status": "timeout", "error": error, "seconds": time.perf_counter() - started}

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

    def _table_failure(
        self, kpi: KPI, step: int, error: str, exc: BaseException | None = None
    ) -> dict[str, float]:
        state = self.states[kpi.name]
        state.table_errors += 1
        if f"{kpi.name}/table" not in self._warned:
            self._warned.add(f"{kpi.name}/table")
            trace = ""
            if exc is not None:
                trace = "\n" + "".join(
                    traceback.format_exception(type(exc), exc, exc.__traceback__)
                )
            warnings.warn(
                f"KPI {kpi.name!r}: its sample rows at step {step} could not be logged ({error}); "
                f"its values are logged, and lost tables are counted in {kpi.key}/table_errors"
                f"{trace}",
                RuntimeWarning,
                stacklevel=3,
            )
        return {f"{kpi.key}/table_errors": float(state.table_errors)}

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
        if payload.get("samples_error"):
            metrics.update(self._table_failure(kpi, step, payload["samples_error"]))
        primary_key = f"{kpi.key}/{kpi.primary}" if kpi.primary else next(iter(values), None)
        primary = values.get(primary_key) if primary_key is not None else None
        # a running total has no best value and no target: its last value is the one that counts
        if primary is not None and math.isfinite(primary) and not kpi.is_cumulative(primary_key):
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


def _values(kpi: KPI, returned: Any) -> dict[str, float]:
    if isinstance(returned, KPIResult):
        returned = returned.value
    if returned is None:
        return {}
    if isinstance(returned, Mapping):
        return {f"{kpi.key}/{sub}": _to_float(kpi.name, v) for sub, v in returned.items()}
    return {kpi.key: _to_float(kpi.name, returned)}


def _rows(samples: Any) -> list[dict[str, Any]] | None:
    """``KPIResult.samples`` as a list of dicts, or ``None`` when there are none."""
    if samples is None:
        return None
    if isinstance(samples, (str, bytes, Mapping)) or not isinstance(samples, Iterable):
        raise TypeError(f"samples must be a sequence of dict rows, got {type(samples).__name__}")
    rows = []
    for row in samples:
        if not isinstance(row, Mapping):
            raise TypeError(f"each sample row must be a dict, got {type(row).__name__} {row!r:.80}")
        rows.append(dict(row))
    return rows or None


def _hint(value: Any) -> str:
    """How to turn a likely mistake into a KPI, for the error message."""
    if isinstance(value, type) and issubclass(value, KPI):
        return f": create one, e.g. {value.__name__}(...)"
    if callable(value):
        return ": wrap a function with lossplug.KPI(name, fn) or decorate it with @lossplug.kpi"
    return ""


class _WatchedMetrics(dict):
    """``ctx.metrics`` as a KPI sees it: a dict that remembers the keys looked up and not found.

    A KPI reading a misspelt key (``ctx.metrics.get("val/perplexty")``) would otherwise get
    ``None`` at every call and never say so; the runner names such keys once the logged names
    are known. A dict subclass, so that ``json.dumps``, ``|`` and the like keep working.
    """

    def __init__(self, metrics: Mapping[str, float], missed: set[str]) -> None:
        super().__init__(metrics)
        self._missed = missed

    def _miss(self, key: Any) -> None:
        if isinstance(key, str):
            self._missed.add(key)

    def __missing__(self, key: Any) -> Any:
        self._miss(key)
        raise KeyError(key)

    def get(self, key: Any, default: Any = None) -> Any:
        if key in self:
            return self[key]
        return default

    def __contains__(self, key: object) -> bool:
        found = super().__contains__(key)
        if not found:
            self._miss(key)
        return found
