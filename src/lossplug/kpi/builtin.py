"""Built-in KPIs: throughput, cost, time to a target, generation quality and code speed-up."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lossplug.kpi._core import KPI, KPIContext, KPIResult
from lossplug.kpi._speedup import (
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
        options.setdefault("uses_model", False)
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
        name: str = "cost",
        every_n_steps: int = 50,
        **options: Any,
    ) -> None:
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
        options.setdefault("higher_is_better", False)
        options.setdefault("uses_model", False)
        options.setdefault("cumulative", True)
        super().__init__(name, self._measure, every_n_steps=every_n_steps, **options)
        self.price_per_device_hour = float(price_per_device_hour)
        self.devices = devices
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
        options.setdefault("higher_is_better", False)  # fewer steps is better
        options.setdefault("at", ("validation_end", "train_epoch_end"))
        options.setdefault("uses_model", False)
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
# CodeSpeedup's default time per program besides its compile and two runs: the model's
# translation of it.
_PROGRAM_OVERHEAD_S = 60.0


class CodeSpeedup(KPI):
    """The business KPI of a Python→C++ translation fine-tune.

    For each Python program, ``translate(ctx, python_source)`` (the model) returns a C++
    translation; :func:`measure_speedup` compiles and runs both, in a namespace sandbox (the
    translation is untrusted code). Logged: ``kpi/<name>/speedup`` (geometric mean of Python
    seconds over C++ seconds, over the translations that give the same output; absent when none
    does), ``kpi/<name>/compile_rate`` and ``kpi/<name>/correct_rate``, and a samples table (with
    the isolation each sample ran under). ``target`` and the best value follow the speed-up.

    Args:
        programs: Python sources, or ``(source, stdin)`` pairs, or dicts with ``"python"`` and
            optionally ``"stdin"``.
        translate: ``translate(ctx, python_source) -> cpp_source``.
        program_timeout_s: time limit of each step: the compile, the Python run, the C++ run.
        memory_mb: memory limit of each program run, in MiB.
        compile_memory_mb: memory limit of the compiler, in MiB.
        sandbox: ``"bwrap"`` (the namespace sandbox), or ``"none"`` to run the translations
            without isolation; default ``$LOSSPLUG_SANDBOX``, else ``"bwrap"``. Checked when the
            KPI is built: where no sandbox can be built, :class:`SandboxUnavailableError` says
            what is missing then, not at the first evaluation.
        timeout_s: time limit of the whole call. Default: enough for every program to be
            translated, compiled and run to its limit twice (Python, then C++), that is
            ``len(programs) * (3 * program_timeout_s + 60)`` seconds, the 60 s covering the
            model's translation. ``None`` for no limit; see :class:`~lossplug.KPI` for the
            other options.

    Example:
        >>> from lossplug.kpi.builtin import CodeSpeedup
        >>> kpi = CodeSpeedup(["print(6 * 7)"], lambda ctx, src: "int main(){}", every_n_steps=500)
        >>> kpi.key
        'kpi/code_speedup'
    """

    def __init__(
        self,
        programs: Sequence[str | tuple[str, str] | Mapping[str, str]],
        translate: Translate,
        *,
        name: str = "code_speedup",
        program_timeout_s: float = 10.0,
        memory_mb: int = 1024,
        compile_memory_mb: int = 2048,
        sandbox: str | None = None,
        **options: Any,
    ) -> None:
        if isinstance(programs, str) or not programs:
            raise ValueError(f"programs must be a non-empty sequence, got {programs!r}")
        if not callable(translate):
            raise TypeError(f"translate must be callable(ctx, python_source), got {translate!r}")
        check_limits(
            program_timeout_s, memory_mb, compile_memory_mb, timeout_name="program_timeout_s"
        )
        self.programs = [_program(item) for item in programs]
        self.translate = translate
        self.program_timeout_s = float(program_timeout_s)
        self.memory_mb = memory_mb
        self.compile_memory_mb = compile_memory_mb
        self.sandbox = check_sandbox(sandbox)
        options.setdefault("primary", "speedup")
        options.setdefault(
            "timeout_s", len(self.programs) * (3 * program_timeout_s + _PROGRAM_OVERHEAD_S)
        )
        super().__init__(name, self._evaluate, **options)

    def _evaluate(self, ctx: KPIContext) -> KPIResult:
        rows, speedups, compiled, correct = [], [], 0, 0
        for python_source, stdin in self.programs:
            try:
                cpp_source = self.translate(ctx, python_source)
            except Exception as exc:  # one bad translation is a failed sample, not a failed KPI
                cpp_source, result = None, None
                error = f"translate raised {type(exc).__name__}: {exc}"
            else:
                result = measure_speedup(
                    python_source,
                    str(cpp_source),
                    stdin=stdin,
                    timeout_s=self.program_timeout_s,
                    memory_mb=self.memory_mb,
                    compile_memory_mb=self.compile_memory_mb,
                    sandbox=self.sandbox,
                )
                error = result.error
            ok_compile = bool(result and result.compiled)
            ok = bool(result and result.correct)
            compiled += ok_compile
            correct += ok
            if ok and result.speedup:
                speedups.append(result.speedup)
            rows.append(
                {
                    "python": python_source,
                    "cpp": cpp_source,
                    "compiled": ok_compile,
                    "correct": ok,
                    "speedup": result.speedup if result else None,
                    "error": error,
                    "isolation": result.isolation if result else None,
                }
            )
        values: dict[str, float] = {}
        if speedups:
            values["speedup"] = math.exp(sum(map(math.log, speedups)) / len(speedups))
        values["compile_rate"] = compiled / len(self.programs)
        values["correct_rate"] = correct / len(self.programs)
        return KPIResult(values, samples=rows)


def _program(item: Any) -> tuple[str, str]:
    if isinstance(item, str):
        return item, ""
    if isinstance(item, Mapping) and isinstance(item.get("python"), str):
        return item["python"], str(item.get("stdin", ""))
    if isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item):
        return item[0], item[1]
    raise ValueError(
        f"each program must be a str, a (source, stdin) pair or a dict with 'python'; got {item!r}"
    )
