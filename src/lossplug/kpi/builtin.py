"""Built-in KPIs: throughput, cost, time to a target, generation quality and code speed-up."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lossplug.kpi._core import KPI, KPIContext, KPIResult
from lossplug.kpi.speedup import (
    SandboxUnavailableError,
    SpeedupResult,
    check_limits,
    check_sandbox,
    measure_speedup,
)

__all__ = [
    "CodeSpeedup",
    "GenerationKPI",
    "SandboxUnavailableError",
    "SpeedupResult",
    "Throughput",
    "TimeToTarget",
    "TrainingCost",
    "measure_speedup",
    "pie_summary",
]


class Throughput(KPI):
    """Tokens and samples per second of training since the previous call.

    Tokens come from ``LossMonitor`` (its cumulative ``train/tokens``), samples from the
    batches the trainer saw on all ranks. The seconds are training time (``ctx.training_s``):
    evaluation and KPI time are left out, so the rate does not dip at an evaluation step. Logs
    ``kpi/<name>/tokens_per_sec`` and ``kpi/<name>/samples_per_sec``.

    Example:
        >>> from lossplug.kpi import KPIContext
        >>> from lossplug.kpi.builtin import Throughput
        >>> speed = Throughput(every_n_steps=10)
        >>> speed.fn(KPIContext(step=10, elapsed_s=3.0, training_s=2.0, tokens=1000, samples=8))
        {'tokens_per_sec': 500.0, 'samples_per_sec': 4.0}
    """

    def __init__(self, name: str = "throughput", *, every_n_steps: int = 50, **options: Any):
        _measures_the_run(options)  # the speed of the run, not what the model produces
        super().__init__(name, self._measure, every_n_steps=every_n_steps, **options)
        self._last: tuple[float, int | None, int | None] = (0.0, 0, 0)

    def _measure(self, ctx: KPIContext) -> dict[str, float] | None:
        now = ctx.elapsed_s if ctx.training_s is None else ctx.training_s
        last_time, last_tokens, last_samples = self._last
        seconds = now - last_time
        if seconds <= 0:  # a new run after a resume: the clock restarted
            seconds, last_tokens, last_samples = now, None, None
        self._last = (now, ctx.tokens, ctx.samples)
        if seconds <= 0:
            return None
        values = {}
        if ctx.tokens is not None and last_tokens is not None:
            values["tokens_per_sec"] = (ctx.tokens - last_tokens) / seconds
        if ctx.samples is not None and last_samples is not None:
            values["samples_per_sec"] = (ctx.samples - last_samples) / seconds
        return values or None


class TrainingCost(KPI):
    """The cost of the run so far: device-hours times a price, and the cost per million tokens.

    Both values are running totals (``cumulative=True``): W&B summarises them by their last
    value, and they have no best value or target (the lowest cost is always the first one).
    Like every cumulative KPI, it runs once more at the end of training, so the run's whole cost
    is logged whatever ``every_n_steps`` is.

    Args:
        price_per_device_hour: what one device (GPU, or CPU process) costs per hour.
        devices: how many devices are billed (default: the number of training processes).
        currency: the unit of ``price_per_device_hour`` (``"USD"``, ``"EUR"``…), recorded with
            the run so that ``lossplug report`` labels the cost with it.
        name: logged as ``kpi/<name>/total`` and ``kpi/<name>/per_million_tokens``.

    Example:
        >>> from lossplug.kpi import KPIContext
        >>> from lossplug.kpi.builtin import TrainingCost
        >>> cost = TrainingCost(price_per_device_hour=2.0, every_n_steps=100)
        >>> cost.fn(KPIContext(step=100, elapsed_s=1800.0, tokens=4_000_000, world_size=4))
        {'total': 4.0, 'per_million_tokens': 1.0}
    """

    def __init__(
        self,
        price_per_device_hour: float,
        *,
        devices: int | None = None,
        currency: str | None = None,
        name: str = "cost",
        every_n_steps: int = 50,
        **options: Any,
    ) -> None:
        if currency is not None and (not isinstance(currency, str) or not currency.strip()):
            raise ValueError(f"currency must be None or a unit such as 'USD', got {currency!r}")
        if (
            isinstance(price_per_device_hour, bool)
            or not isinstance(price_per_device_hour, (int, float))
            or not 0 <= price_per_device_hour < math.inf
        ):
            raise ValueError(
                f"price_per_device_hour must be a finite number >= 0, got {price_per_device_hour!r}"
            )
        if devices is not None and (
            isinstance(devices, bool) or not isinstance(devices, int) or devices < 1
        ):
            raise ValueError(f"devices must be None or an int >= 1, got {devices!r}")
        _measures_the_run(options)  # what the run cost, not what the model produces
        options.setdefault("higher_is_better", False)
        options.setdefault("cumulative", True)
        options.setdefault("unit", currency)
        super().__init__(name, self._measure, every_n_steps=every_n_steps, **options)
        self.price_per_device_hour = float(price_per_device_hour)
        self.devices = devices
        self.currency = currency
        self._hours_before = 0.0  # device-hours of earlier runs of a resumed fit
        self._last_elapsed = 0.0

    def _measure(self, ctx: KPIContext) -> dict[str, float]:
        if ctx.elapsed_s < self._last_elapsed:  # clock restarted after a resume
            self._hours_before += self._last_elapsed / 3600 * self._devices(ctx)
        self._last_elapsed = ctx.elapsed_s
        device_hours = self._hours_before + ctx.elapsed_s / 3600 * self._devices(ctx)
        total = device_hours * self.price_per_device_hour
        values = {"total": total}
        if ctx.tokens:
            values["per_million_tokens"] = total / (ctx.tokens / 1e6)
        return values

    def _devices(self, ctx: KPIContext) -> int:
        return self.devices or ctx.world_size

    def state_dict(self) -> dict[str, Any]:
        return {"hours_before": self._hours_before, "last_elapsed": self._last_elapsed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # the saved run's whole time is now in the past
        self._hours_before = state["hours_before"]
        self._last_elapsed = state["last_elapsed"]


class TimeToTarget(KPI):
    """The step and wall-clock seconds at which a logged metric first reached a target.

    Nothing is logged until the target is met; then ``kpi/<name>/step`` and
    ``kpi/<name>/seconds_to_target`` (the same values at every later call).

    A ``metric`` that is still not logged after the first validation (a typo such as
    ``"val/perplexty"``) is warned about once by ``KPIMonitor``, with the closest logged names.

    Args:
        metric: a logged key, e.g. ``"val/perplexity"``.
        target: the value to reach.
        higher_is_better: ``False`` for losses and perplexities (reach = at or below).
        name: default ``time_to_<metric>``, characters a KPI name cannot hold made ``_``.

    Example:
        >>> from lossplug.kpi import KPIContext
        >>> from lossplug.kpi.builtin import TimeToTarget
        >>> ttt = TimeToTarget("val/perplexity", 20.0)
        >>> ttt.fn(KPIContext(step=5, elapsed_s=3.0, metrics={"val/perplexity": 25.0})) is None
        True
        >>> ttt.fn(KPIContext(step=9, elapsed_s=7.5, metrics={"val/perplexity": 19.0}))
        {'step': 9.0, 'seconds_to_target': 7.5}
    """

    def __init__(
        self,
        metric: str,
        target: float,
        *,
        higher_is_better: bool = False,
        name: str | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(metric, str) or not metric:
            raise ValueError(
                f"metric must be a logged key such as 'val/perplexity', got {metric!r}"
            )
        if isinstance(target, bool) or not isinstance(target, (int, float)) or math.isnan(target):
            raise ValueError(f"target must be a number, got {target!r}")
        if not isinstance(higher_is_better, bool):
            raise TypeError(f"higher_is_better must be True or False, got {higher_is_better!r}")
        default_name = "time_to_" + "".join(
            ch if ch.isalnum() or ch in "_-." else "_" for ch in metric
        ).rstrip(".")
        _measures_the_run(options)  # when the run got there, not what the model does
        options.setdefault("higher_is_better", False)  # fewer steps is better
        options.setdefault("at", ("validation_end", "train_epoch_end"))
        super().__init__(name or default_name, self._check, **options)
        self.metric = metric
        self.metric_target = float(target)
        self.metric_higher_is_better = higher_is_better
        self._reached: tuple[int, float] | None = None
        self._seconds_before = 0.0
        self._last_elapsed = 0.0

    def _check(self, ctx: KPIContext) -> dict[str, float] | None:
        if ctx.elapsed_s < self._last_elapsed:  # clock restarted after a resume
            self._seconds_before += self._last_elapsed
        self._last_elapsed = ctx.elapsed_s
        if self._reached is None:
            value = ctx.metrics.get(self.metric)
            if value is None or math.isnan(value):
                return None
            met = (
                value >= self.metric_target
                if self.metric_higher_is_better
                else value <= self.metric_target
            )
            if not met:
                return None
            self._reached = (ctx.step, self._seconds_before + ctx.elapsed_s)
        step, seconds = self._reached
        return {"step": float(step), "seconds_to_target": seconds}

    def state_dict(self) -> dict[str, Any]:
        return {
            "reached": self._reached,
            "seconds_before": self._seconds_before,
            "last_elapsed": self._last_elapsed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reached = None if state["reached"] is None else tuple(state["reached"])
        self._seconds_before = state["seconds_before"]
        self._last_elapsed = state["last_elapsed"]


GenerateFn = Callable[[KPIContext, Sequence[str], int], Sequence[str]]
Scorer = Callable[[str, str], float]


class GenerationKPI(KPI):
    """Generate from prompts with the model being trained, score each output, log the mean.

    Generation goes through ``generate_fn(ctx, prompts, max_new_tokens) -> outputs`` or, when it
    is not given, through Hugging Face ``ctx.model.generate`` with ``tokenizer`` (greedy). The
    mean of ``scorer(prompt, output)`` is logged as ``kpi/<name>``, with a samples table
    (prompt, output, score) bounded by ``max_samples``.

    Example:
        >>> from lossplug.kpi import KPIContext
        >>> from lossplug.kpi.builtin import GenerationKPI
        >>> echo = lambda ctx, prompts, n: [p.upper() for p in prompts]
        >>> shouts = GenerationKPI(["hi", "yo"], lambda p, out: float(out.isupper()),
        ...                        generate_fn=echo)
        >>> result = shouts.fn(KPIContext(step=1))
        >>> result.value, len(result.samples)
        (1.0, 2)
    """

    def __init__(
        self,
        prompts: Sequence[str],
        scorer: Scorer,
        *,
        generate_fn: GenerateFn | None = None,
        tokenizer: Any = None,
        max_samples: int = 16,
        max_new_tokens: int = 64,
        name: str = "generation",
        **options: Any,
    ) -> None:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or not prompts:
            raise ValueError(f"prompts must be a non-empty sequence of str, got {prompts!r}")
        if not callable(scorer):
            raise TypeError(f"scorer must be callable(prompt, output) -> float, got {scorer!r}")
        if generate_fn is None and tokenizer is None:
            raise ValueError("give generate_fn, or a tokenizer for Hugging Face model.generate")
        if generate_fn is not None and not callable(generate_fn):
            raise TypeError(f"generate_fn must be callable, got {generate_fn!r}")
        for arg, value in (("max_samples", max_samples), ("max_new_tokens", max_new_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be an int >= 1, got {value!r}")
        super().__init__(name, self._evaluate, **options)
        self.prompts = list(prompts)[:max_samples]
        self.scorer = scorer
        self.generate_fn = generate_fn
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens

    def _evaluate(self, ctx: KPIContext) -> KPIResult:
        if self.generate_fn is not None:
            outputs = list(self.generate_fn(ctx, self.prompts, self.max_new_tokens))
        else:
            outputs = self._hf_generate(ctx)
        if len(outputs) != len(self.prompts):
            raise ValueError(f"got {len(outputs)} outputs for {len(self.prompts)} prompts")
        rows = []
        for prompt, output in zip(self.prompts, outputs, strict=True):
            rows.append(
                {"prompt": prompt, "output": output, "score": float(self.scorer(prompt, output))}
            )
        mean = sum(row["score"] for row in rows) / len(rows)
        return KPIResult(mean, samples=rows)

    def _hf_generate(self, ctx: KPIContext) -> list[str]:
        model = ctx.model
        inner = getattr(model, "model", model)  # a LightningModule that wraps the HF model
        if not hasattr(inner, "generate"):
            raise TypeError(
                f"{type(model).__name__} has no generate(): pass generate_fn to GenerationKPI"
            )
        tokenizer = self.tokenizer
        if getattr(tokenizer, "pad_token", None) is None and hasattr(tokenizer, "eos_token"):
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # decoder-only models continue the right end
        batch = tokenizer(self.prompts, return_tensors="pt", padding=True).to(ctx.device)
        with torch.no_grad():
            generated = inner.generate(
                **batch,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


Translate = Callable[[KPIContext, str], str]
# CodeSpeedup's default time per program besides its compile and runs: the model's translation.
_PROGRAM_OVERHEAD_S = 60.0
# PIE's threshold: a translation is "optimised" when it is correct and at least this much faster.
OPTIMISED_SPEEDUP = 1.1


class CodeSpeedup(KPI):
    """The business KPI of a Python→C++ translation fine-tune, scored as PIE scores code edits.

    For each Python program, ``translate(ctx, python_source)`` (the model) returns a C++
    translation; :func:`measure_speedup` compiles it and runs both programs on each of the
    program's inputs, in a namespace sandbox (the translation is untrusted code). The inputs are
    never shown to ``translate``, and a translation is correct only if it prints what the
    reference prints on every one of them, so a translation cannot print answers it worked out
    in advance. Each program runs ``repeats`` times on each input and the least time is kept; a
    speed-up no larger than the spread of the repeats is noise and counts as none.

    Logged, following PIE (Shypula et al., "Learning Performance-Improving Code Edits", ICLR
    2024): ``kpi/<name>/correct_rate`` (share of programs translated correctly),
    ``kpi/<name>/optimised_rate`` (correct and at least 1.1× faster, beyond the noise) and
    ``kpi/<name>/mean_speedup`` (mean over all programs, an incorrect, slower or within-the-noise
    one counting as 1.0×: the primary value). Beside them ``kpi/<name>/speedup`` (geometric mean
    over the correct translations only; absent when none is), ``kpi/<name>/compile_rate``, and
    a samples table with each program's outcome, spread, flags and isolation. A program whose
    reference prints the same output for all its inputs is flagged ``precomputable`` and counts
    as 1.0×.

    Args:
        programs: Each a dict with ``"python"`` (the source) and ``"inputs"`` (a list of stdin
            texts, at least one not empty), or a ``(source, inputs)`` pair where ``inputs`` is
            a list or a single stdin text. A dict with ``"stdin"`` is one input. A program
            without input is refused: its output is fixed, and a translation could print it.
        translate: ``translate(ctx, python_source) -> cpp_source``.
        program_timeout_s: time limit of each step: the compile, each Python run, each C++ run.
        memory_mb: memory limit of each program run, in MiB.
        compile_memory_mb: memory limit of the compiler, in MiB.
        repeats: runs of each program on each input; the least time is kept.
        sandbox: ``"bwrap"`` (the namespace sandbox), or ``"none"`` to run the translations
            without isolation; default ``$LOSSPLUG_SANDBOX``, else ``"bwrap"``. Checked when the
            KPI is built: where no sandbox can be built, :class:`SandboxUnavailableError` says
            what is missing then, not at the first evaluation.
        timeout_s: time limit of the whole call. Default: enough for every program to be
            translated (60 s), compiled, and run to its limit ``repeats`` times on each input
            (Python, then C++). ``None`` for no limit; see :class:`~lossplug.KPI` for the other
            options.

    Example:
        >>> from lossplug.kpi.builtin import CodeSpeedup
        >>> program = {"python": "print(int(input()) * 2)", "inputs": ["1\\n", "7\\n"]}
        >>> kpi = CodeSpeedup([program], lambda ctx, src: "int main(){}", every_n_steps=500)
        >>> kpi.key, kpi.primary
        ('kpi/code_speedup', 'mean_speedup')
    """

    def __init__(
        self,
        programs: Sequence[str | tuple[str, str | Sequence[str]] | Mapping[str, Any]],
        translate: Translate,
        *,
        name: str = "code_speedup",
        program_timeout_s: float = 10.0,
        memory_mb: int = 1024,
        compile_memory_mb: int = 2048,
        repeats: int = 3,
        sandbox: str | None = None,
        **options: Any,
    ) -> None:
        if isinstance(programs, str) or not programs:
            raise ValueError(f"programs must be a non-empty sequence, got {programs!r}")
        if not callable(translate):
            raise TypeError(f"translate must be callable(ctx, python_source), got {translate!r}")
        check_limits(
            program_timeout_s,
            memory_mb,
            compile_memory_mb,
            repeats,
            timeout_name="program_timeout_s",
        )
        self.programs = [_program(index, item) for index, item in enumerate(programs)]
        self.translate = translate
        self.program_timeout_s = float(program_timeout_s)
        self.memory_mb = memory_mb
        self.compile_memory_mb = compile_memory_mb
        self.repeats = repeats
        self.sandbox = check_sandbox(sandbox)
        options.setdefault("primary", "mean_speedup")
        runs = sum(1 + 2 * repeats * len(inputs) for _, inputs in self.programs)
        options.setdefault(
            "timeout_s", runs * program_timeout_s + len(self.programs) * _PROGRAM_OVERHEAD_S
        )
        super().__init__(name, self._evaluate, **options)

    def _evaluate(self, ctx: KPIContext) -> KPIResult:
        rows, results = [], []
        for python_source, inputs in self.programs:
            try:
                cpp_source = self.translate(ctx, python_source)
            except Exception as exc:  # one bad translation is a failed sample, not a failed KPI
                cpp_source, result = None, None
                error = f"translate raised {type(exc).__name__}: {exc}"
            else:
                result = measure_speedup(
                    python_source,
                    str(cpp_source),
                    stdin=inputs,
                    timeout_s=self.program_timeout_s,
                    memory_mb=self.memory_mb,
                    compile_memory_mb=self.compile_memory_mb,
                    repeats=self.repeats,
                    sandbox=self.sandbox,
                )
                error = result.error
            results.append(result)
            rows.append(
                {
                    "python": python_source,
                    "cpp": cpp_source,
                    "inputs": len(inputs),
                    "compiled": bool(result and result.compiled),
                    "correct": bool(result and result.correct),
                    "speedup": result.speedup if result else None,
                    "spread": result.spread if result else None,
                    "optimised": result is not None and _optimised(result),
                    "counted_speedup": _counted_speedup(result),
                    "precomputable": bool(result and result.precomputable),
                    "error": error,
                    "isolation": result.isolation if result else None,
                    "memory_isolation": result.memory_isolation if result else None,
                }
            )
        return KPIResult(pie_summary(results), samples=rows)


def _measures_the_run(options: dict[str, Any]) -> None:
    """The defaults of a built-in that measures the run from its context alone."""
    options.setdefault("outcome", False)
    options.setdefault("uses_model", False)
    # lossplug's own arithmetic on the context: it cannot hang, so it runs inline, where a
    # worker thread would cost a hand-over between threads at every call
    options.setdefault("timeout_s", None)


def pie_summary(results: Sequence[SpeedupResult | None]) -> dict[str, float]:
    """PIE's aggregates over one evaluation's programs (``None``: the translation failed).

    Returns:
        ``correct_rate``, ``optimised_rate``, ``mean_speedup`` (failures and speed-ups within
        the noise as 1.0), ``compile_rate``, and ``speedup``, the geometric mean over the
        correct translations, when there is one.

    Example:
        >>> fast = SpeedupResult(True, True, 4.0, 0.4, 0.1, None, spread=0.05)
        >>> noise = SpeedupResult(True, True, 1.2, 0.12, 0.1, None, spread=0.3)
        >>> pie_summary([fast, noise, None])["mean_speedup"]
        2.0
    """
    count = len(results)
    correct = [r for r in results if r is not None and r.correct]
    values = {
        "correct_rate": len(correct) / count,
        "optimised_rate": sum(_optimised(r) for r in correct) / count,
        "mean_speedup": sum(_counted_speedup(r) for r in results) / count,
        "compile_rate": sum(bool(r and r.compiled) for r in results) / count,
    }
    speedups = [r.speedup for r in correct if r.speedup]
    if speedups:
        values["speedup"] = math.exp(sum(map(math.log, speedups)) / len(speedups))
    return values


def _beyond_noise(result: SpeedupResult) -> bool:
    """A correct translation's speed-up is larger than its timings' own spread."""
    assert result.speedup is not None
    return result.speedup > 1.0 + (result.spread or 0.0) and not result.precomputable


def _optimised(result: SpeedupResult) -> bool:
    return (
        result.correct
        and result.speedup is not None
        and result.speedup >= OPTIMISED_SPEEDUP
        and _beyond_noise(result)
    )


def _counted_speedup(result: SpeedupResult | None) -> float:
    """The speed-up PIE's mean counts: 1.0 unless correct and faster beyond the noise."""
    if result is None or not result.correct or result.speedup is None:
        return 1.0
    return result.speedup if _beyond_noise(result) else 1.0


def _program(index: int, item: Any) -> tuple[str, list[str]]:
    """``(source, inputs)`` of one ``programs`` item; refuse a program with no input."""
    source: Any = None
    inputs: Any = None
    if isinstance(item, Mapping) and isinstance(item.get("python"), str):
        source = item["python"]
        inputs = item.get("inputs", [item["stdin"]] if "stdin" in item else [])
    elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        source, inputs = item
    elif isinstance(item, str):
        source, inputs = item, []
    else:
        raise ValueError(
            "each program must be a dict with 'python' and 'inputs', or a (source, inputs) "
            f"pair; got {item!r}"
        )
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, (list, tuple)) or not all(isinstance(x, str) for x in inputs):
        raise ValueError(f"program {index}: inputs must be a list of stdin texts, got {inputs!r}")
    if not any(inputs):
        raise ValueError(
            f"program {index} has no input: its output is fixed, so a translation could print "
            "it without computing anything. Give it inputs (several, so that no single answer "
            "passes): {'python': source, 'inputs': ['3\\n', '1000\\n', ...]}"
        )
    return source, list(inputs)
