"""CPU benchmark of what ``LossMonitor`` and ``KPIMonitor`` add to a Lightning training step.

The training loop of ``examples/finetune.py`` (its ``ByteGPT`` and ``CausalLMFineTune``, imported
from the file; half its batch, for a short step) runs in a real
``lightning.pytorch.Trainer`` (progress bar, checkpointing and model summary off; a ``CSVLogger``
in a temporary folder, or none with ``--logger none``) in these configurations:

- **A** baseline: ``training_step`` returns ``{"loss": loss, "stats": stats}`` from
  ``lossplug.cross_entropy(..., shift=True, return_stats=True)``; no lossplug callback;
- **B** A + ``LossMonitor(log_every_n_steps=10)``;
- **C** B + ``KPIMonitor([Throughput(every_n_steps=10), TrainingCost(2.5, every_n_steps=10)])``;
- **D** A with plain ``F.cross_entropy`` on the shifted logits (no stats): the loss's own cost,
  for scale.

Each configuration is one ``fit`` of ``--warmup`` + ``--steps`` optimizer steps from the same
initial weights and batches; the configurations run in turn, the order rotated each round, for
``--rounds`` rounds after one warm-up round, so that load from other processes and drifts of the
machine's speed hit them alike. The first ``--warmup`` steps of each fit are dropped.

Three stamps per step, from a callback put first and one put last: ``on_train_batch_start``
(first), ``on_train_batch_end`` (first) and ``on_train_batch_end`` (last). So each step splits
into the forward, backward and optimizer step; the lossplug callbacks' ``on_train_batch_end``
(``in lossplug hooks``: they run between the first and the last callback); and everything up to
the next step's start (``after the hooks``: the module's hook, Lightning's bookkeeping of logged
values, the scheduler, the next batch). The callbacks do most of their work at logging steps
(every 10th optimizer step), so a time per step weights the two kinds of steps as they occur,
each by its median (robust to the odd step another process slowed down):
``(9 × median ordinary step + median logging step) / 10`` per round, then the median over
rounds.

Two measures of the overhead:

- end to end: each round's time per step over the same round's baseline, median and
  interquartile range over rounds. Honest but noisy: on a shared 2-core VM the speed of whole
  fits drifts by several percent, more than the effect measured;
- ``callback cost`` = in lossplug hooks + (after the hooks − the baseline's after the hooks),
  per step, over the baseline's time per step: where the callbacks spend time, measured where
  it is spent, without the forward/backward noise. It would miss an indirect cost inside the
  forward or backward (none is expected: the hooks do not run there), which the end-to-end
  ratio bounds.

DESIGN.md target: the callbacks cost at most 2% of the step time; the verdict column judges the
callback cost (≤ 2.00% at the precision shown), the end-to-end ratio is its cross-check.

``--check-sync`` is the other half of that target, no host synchronisation between logging
steps; it needs a CUDA GPU (on a CPU-only machine it says so and exits 0). It runs the same loop
on the GPU under ``torch.cuda.set_sync_debug_mode("error")``, armed on every step but the
logging steps and released at each batch's host-to-device copy; see :func:`check_sync`.

Usage::

    python benchmarks/callback_overhead.py                # full run
    python benchmarks/callback_overhead.py --quick        # smaller model, fewer steps
    python benchmarks/callback_overhead.py --steps 100 --rounds 11
    python benchmarks/callback_overhead.py --check-sync   # on a CUDA machine
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import _harness as H
import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

import lossplug
from lossplug.kpi.builtin import Throughput, TrainingCost

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune.py"
LOG_EVERY = 10  # LossMonitor's and the KPIs' logging interval, in optimizer steps
TARGET_PCT = 2.0  # DESIGN.md: callback overhead ≤ 2% of the step time
PRICE_PER_DEVICE_HOUR = 2.5

CONFIGS = {
    "A": "baseline: fused loss + stats, no lossplug callback",
    "B": "A + LossMonitor(log_every_n_steps=10)",
    "C": "B + KPIMonitor([Throughput, TrainingCost], every 10 steps)",
    "D": "plain F.cross_entropy, no stats, no callback",
}


@dataclass(frozen=True)
class Shape:
    """The model and batch (``ByteGPT`` of ``examples/finetune.py``)."""

    width: int
    layers: int
    heads: int
    batch: int
    seq_len: int

    def __str__(self) -> str:
        return (
            f"ByteGPT width {self.width}, {self.layers} layers, {self.heads} heads, "
            f"batch {self.batch} x {self.seq_len} bytes"
        )


FULL = Shape(width=96, layers=3, heads=4, batch=8, seq_len=96)
QUICK = Shape(width=64, layers=2, heads=4, batch=4, seq_len=64)


# ----------------------------------------------------------------------------------------------
# the training loop


def load_example() -> ModuleType:
    """``examples/finetune.py`` as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("lossplug_example_finetune", EXAMPLE)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {EXAMPLE}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    if str(EXAMPLE.parent) not in sys.path:  # where a script finds its neighbours
        sys.path.insert(0, str(EXAMPLE.parent))
    spec.loader.exec_module(module)
    return module


def quiet_lightning() -> None:
    """No per-fit banners ("GPU available…", tips) or warnings about this loop's set-up."""
    # lossplug's callbacks import every Lightning namespace there is (the last one imported
    # owns the rank-zero logger), and each sets its logger to INFO when imported: import first
    from lossplug.callbacks._compat import LIGHTNING_MODULES

    names = ["lightning.fabric", "lightning_fabric", *(m.__name__ for m in LIGHTNING_MODULES)]
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (
        ".*does not have many workers.*",
        ".*log_every_n_steps.*",
        ".*`validation_step` but have no `val_dataloader`.*",
        ".*LeafSpec.*",
    ):
        warnings.filterwarnings("ignore", pattern)


class StepClock(L.Callback):
    """The first callback: stamps each step's start, and the start of the callbacks'
    ``on_train_batch_end`` hooks."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.hooks_from: list[float] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int):
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.hooks_from.append(time.perf_counter())


class HooksDone(L.Callback):
    """The last callback: stamps the end of the callbacks' ``on_train_batch_end`` hooks."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.stamps.append(time.perf_counter())


def plain_ce_module(example: ModuleType) -> type:
    """``CausalLMFineTune`` with the usual ``F.cross_entropy`` on shifted logits (config D)."""

    class PlainCE(example.CausalLMFineTune):
        def training_step(self, ids, batch_idx):
            logits = self.model(ids)
            vocab = logits.shape[-1]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
            return {"loss": loss}

    return PlainCE


def lossplug_callbacks(config: str) -> list[Any]:
    callbacks: list[Any] = []
    if config in ("B", "C"):
        callbacks.append(lossplug.LossMonitor(log_every_n_steps=LOG_EVERY))
    if config == "C":
        kpis = [
            Throughput(every_n_steps=LOG_EVERY),
            TrainingCost(PRICE_PER_DEVICE_HOUR, every_n_steps=LOG_EVERY),
        ]
        callbacks.append(lossplug.KPIMonitor(kpis))
    return callbacks


class Loop:
    """Everything one ``fit`` needs, built once: the example, the data, the settings."""

    def __init__(self, shape: Shape, max_steps: int, logger: str, seed: int = 0) -> None:
        self.example = load_example()
        self.shape, self.max_steps, self.logger, self.seed = shape, max_steps, logger, seed
        # the training text of the example (about 1 MiB of the standard library)
        text, _, _ = self.example.stdlib_sources(2**20)
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        self.data = self.example.Windows(ids, shape.seq_len, max_steps * shape.batch, seed)
        self._tmp = tempfile.TemporaryDirectory(prefix="lossplug_callback_overhead_")
        self.log_dir = self._tmp.name  # the CSV logs; removed at exit
        self.plain_ce = plain_ce_module(self.example)

    def module_class(self, config: str) -> type:
        return self.plain_ce if config == "D" else self.example.CausalLMFineTune

    def module(self, config: str, klass: type | None = None) -> L.LightningModule:
        """A fresh module of ``config`` (or ``klass``), with the same initial weights each time."""
        torch.manual_seed(self.seed)
        s = self.shape
        model = self.example.ByteGPT(
            width=s.width, layers=s.layers, heads=s.heads, context=s.seq_len
        )
        return (klass or self.module_class(config))(model, 3e-3, self.max_steps, False)

    def trainer(self, config: str, callbacks: Sequence[Any], accelerator: str = "cpu") -> L.Trainer:
        logger: Any = False
        if self.logger == "csv":
            logger = CSVLogger(self.log_dir, name=config)
        return L.Trainer(
            max_steps=self.max_steps,
            accelerator=accelerator,
            devices=1,
            logger=logger,
            callbacks=list(callbacks),
            log_every_n_steps=LOG_EVERY,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            gradient_clip_val=1.0,  # as in examples/finetune.py
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
        )

    def loader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.shape.batch, shuffle=False)

    def fit(self, config: str) -> dict[str, list[float]]:
        """One fit of ``config``; for each step but the last, in seconds: ``"step"`` its whole
        duration, ``"hooks"`` the time in the lossplug callbacks' ``on_train_batch_end`` (between
        the first and the last callback's), ``"after"`` the time from there to the next step's
        start (Lightning's bookkeeping, the scheduler, the next batch)."""
        clock, done = StepClock(), HooksDone()
        trainer = self.trainer(config, [clock, *lossplug_callbacks(config), done])
        trainer.fit(self.module(config), self.loader())
        if trainer.global_step != self.max_steps:
            raise RuntimeError(f"config {config} stopped at step {trainer.global_step}")
        n = len(clock.starts) - 1
        nxt = clock.starts[1:]
        return {
            "step": [b - a for a, b in zip(clock.starts[:n], nxt, strict=True)],
            "hooks": [b - a for a, b in zip(clock.hooks_from[:n], done.stamps[:n], strict=True)],
            "after": [b - a for a, b in zip(done.stamps[:n], nxt, strict=True)],
        }


# ----------------------------------------------------------------------------------------------
# timing


def per_step(rounds: Sequence[Sequence[float]], first_step: int) -> float:
    """Time per optimizer step from per-step times: ``(9 × median of the ordinary steps + median
    of the logging steps) / 10``, i.e. the two kinds weighted as they occur but each robust to
    the odd step that another process slowed down. ``first_step`` is the optimizer step that
    ends the first interval of each round."""
    ordinary, logging_ = [], []
    for times in rounds:
        for i, t in enumerate(times):
            (logging_ if (first_step + i) % LOG_EVERY == 0 else ordinary).append(t)
    return ((LOG_EVERY - 1) * statistics.median(ordinary) + statistics.median(logging_)) / LOG_EVERY


@dataclass
class Timing:
    """Per-step times of one configuration by part (see :meth:`Loop.fit`), one list per round,
    warm-up steps dropped."""

    config: str
    parts: dict[str, list[list[float]]]
    first_step: int

    def per_step(self, part: str) -> float:
        """Median over rounds of each round's time per step in ``part``."""
        return statistics.median(self.rounds(part))

    def rounds(self, part: str = "step") -> list[float]:
        """Each round's time per step in ``part``."""
        return [per_step([times], self.first_step) for times in self.parts[part]]

    def median(self, part: str, logging_step: bool) -> float:
        """Median over rounds of each round's median ordinary (or logging) step in ``part``."""
        return statistics.median(
            statistics.median(
                t
                for i, t in enumerate(times)
                if ((self.first_step + i) % LOG_EVERY == 0) == logging_step
            )
            for times in self.parts[part]
        )

    def cost_s(self, base: Timing) -> float:
        """What the callbacks cost per step, measured where it is spent: their hooks, and how
        much longer Lightning's part after them takes than in ``base``."""
        return self.per_step("hooks") + self.per_step("after") - base.per_step("after")


def measure(loop: Loop, configs: Sequence[str], rounds: int, warmup: int) -> dict[str, Any]:
    """``rounds`` rounds of every configuration after a warm-up round, the order rotated each
    round (each configuration takes each place equally often); ``{"timings": {config:
    Timing}, "errors": {config: message}, "background_cpu": share of all cores other processes
    used}``."""
    parts: dict[str, dict[str, list[list[float]]]] = {c: {} for c in configs}
    errors: dict[str, str] = {}
    for config in configs:  # warm-up: imports, lazy set-up, thread pools, allocator
        try:
            loop.fit(config)
        except Exception:
            errors[config] = H.last_error_line()
    live = [c for c in configs if c not in errors]
    with H.background_meter() as load:
        for r in range(rounds):
            for config in live[r % len(live) :] + live[: r % len(live)]:
                gc.collect()
                for part, times in loop.fit(config).items():
                    parts[config].setdefault(part, []).append(times[warmup:])
            if sys.stdout.isatty():
                print(f"\r  round {r + 1}/{rounds}", end="", flush=True)
        if sys.stdout.isatty():
            print()
    timings = {c: Timing(c, parts[c], first_step=warmup + 1) for c in live}
    return {"timings": timings, "errors": errors, "background_cpu": load["share"]}


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, q2, q3


def format_table(timings: dict[str, Timing], errors: dict[str, str]) -> str:
    head = [
        "config",
        "what",
        "steps/s",
        "ms/step",
        "ordinary / logging step ms",
        "ratio vs A: median of rounds (IQR)",
        "in lossplug hooks ms/step",
        "after the hooks ms/step",
        "callback cost ms/step",
        "cost ÷ A's step",
        "≤ 2%",
    ]
    base = timings.get("A")
    rows = []
    for config, what in CONFIGS.items():
        if config in errors:
            rows.append([config, what, f"error: {errors[config]}"])
            continue
        t = timings.get(config)
        if t is None:
            continue
        ms = t.per_step("step")
        cells = [config, what, f"{1 / ms:.2f}", f"{1e3 * ms:.2f}"]
        cells.append(f"{1e3 * t.median('step', False):.2f} / {1e3 * t.median('step', True):.2f}")
        cells += ["—", "—", f"{1e3 * t.per_step('after'):.3f}", "—", "—", "—"]
        if config in "BC":
            cells[6] = f"{1e3 * t.per_step('hooks'):.3f}"
        if base is not None and config != "A":
            per_round = [x / a for x, a in zip(t.rounds(), base.rounds(), strict=True)]
            q1, median, q3 = _quartiles(per_round)
            cells[5] = f"{median:.3f}x ({q1:.3f}-{q3:.3f})"
            if config in "BC":
                share = t.cost_s(base) / base.per_step("step")
                cells[8] = f"{1e3 * t.cost_s(base):.3f}"
                cells[9] = f"{100 * share:.2f}%"
                cells[10] = H.verdict(100 * share, TARGET_PCT)
            else:
                cells[10] = "(the loss, not a callback)"
        rows.append(cells)
    return "\n".join(H.markdown_table(head, rows))


def run_benchmark(args: argparse.Namespace) -> int:
    policy = H.load_policy(args)
    shape = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    loop = Loop(shape, args.warmup + args.steps + 1, args.logger)
    configs = [c for c in CONFIGS if c != "D" or not args.no_plain]
    info = H.machine_info(lightning=L.__version__)
    method = (
        f"{shape}; {args.rounds} rounds of {', '.join(configs)} (order rotated each round) after "
        f"a warm-up round, each a fit of {args.warmup} + {args.steps} optimizer steps (the first "
        f"{args.warmup} dropped); logger: {args.logger}; per step = (9 × median ordinary step + "
        f"median logging step) / 10; {H.describe_policy(policy)}"
    )
    print(H.header("lossplug callback overhead (CPU)", info, args.threads, method))
    print(f"- load average before: {H.loadavg()}", flush=True)
    started = time.perf_counter()

    def attempt() -> dict[str, Any]:
        result = measure(loop, configs, args.rounds, args.warmup)
        print(f"  timed: background CPU {H.pct(result['background_cpu'])}", flush=True)
        return result

    result, shares = H.quietest(attempt, policy)
    seconds = time.perf_counter() - started
    print(f"- load average after: {H.loadavg()}; total wall time {seconds:.0f} s")
    print(
        "- background CPU (other processes, share of all cores) while timed: "
        + ", ".join(map(H.pct, shares))
        + (" (one per attempt; the quietest is reported)" if len(shares) > 1 else "")
    )
    print(
        "- ms/step: each round's (9 × median ordinary step + median logging step) / 10, median "
        "over rounds (likewise for the parts); ratio vs A: each round's time per step over the "
        "same round's A, median and interquartile range over rounds (end to end, with the "
        "noise between fits); in lossplug hooks: between the first and the last callback's "
        "on_train_batch_end; after the hooks: from there to the next step's start (Lightning's "
        "bookkeeping, scheduler, next batch); callback cost = in hooks + (after the hooks - A's)"
    )
    print()
    print(format_table(result["timings"], result["errors"]))
    if args.json:
        payload = {
            "machine": info,
            "argv": sys.argv,
            "background_cpu": shares,
            "errors": result["errors"],
            "first_step": args.warmup + 1,
            "log_every": LOG_EVERY,
            "seconds_per_step": {c: t.parts for c, t in result["timings"].items()},
        }
        with open(args.json, "w") as fh:
            json.dump(payload, fh)
    return 1 if result["errors"] else 0


# ----------------------------------------------------------------------------------------------
# --check-sync


SetMode = Callable[[str], None]


class SyncGuard(L.Callback):
    """Arms ``set_sync_debug_mode("error")`` for the steps between logging steps (put it first).

    ``scope="step"`` arms it in ``on_train_batch_start``: the forward, backward, optimizer step
    and every hook after it are checked. ``scope="callbacks"`` arms it in
    ``on_train_batch_end`` (before the lossplug callbacks run, since this one is first): only
    the callbacks and what Lightning does after them are checked, so a sync in the model or the
    loss does not hide the callbacks' verdict. Either way the mode goes back to ``"default"``
    at a logging step's ``on_train_batch_end`` (before the monitors log), at the next batch's
    ``on_before_batch_transfer`` (the host-to-device copy of the batch is a sync by nature), at
    the end of training and on an exception. The first logging window is not checked (kernel
    compilation, autotuning and allocator growth happen there).
    """

    def __init__(self, scope: str, every: int, set_mode: SetMode) -> None:
        self.scope, self.every, self.set_mode = scope, every, set_mode
        self.armed_steps = 0

    def _arm(self, trainer: Any) -> None:
        if trainer.global_step >= self.every:
            self.set_mode("error")
            self.armed_steps += 1

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int):
        if self.scope == "step":
            self._arm(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step >= trainer.max_steps:
            self.set_mode("default")  # a logging step: the monitors may sync now
        elif self.scope == "callbacks":
            self._arm(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.set_mode("default")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.set_mode("default")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.set_mode("default")


class SyncAtOrdinarySteps(L.Callback):
    """The positive control: ``float(loss)`` (a host sync) at every step but logging steps."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every:
            float(outputs["loss"])


def released_module(klass: type, set_mode: SetMode) -> type:
    """``klass`` that puts the sync debug mode back to ``"default"`` before each batch's copy to
    the device (every hook of the previous step has run by then)."""

    class Released(klass):
        def on_before_batch_transfer(self, batch, dataloader_idx):
            set_mode("default")
            return batch

    return Released


def _short(frame: traceback.FrameSummary) -> str:
    path = frame.filename.replace(os.sep, "/")
    for marker in ("/site-packages/", "/src/", "/benchmarks/", "/examples/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{frame.lineno} {frame.name}"


def _where(exc: BaseException, frames: int = 3) -> str:
    """The exception's first line and the innermost ``frames`` frames outside torch (a sync's
    call site: lossplug, Lightning or this script), innermost last."""
    stack = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    text = str(exc).strip()
    message = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {message} [{' > '.join(_short(f) for f in stack[-frames:])}]"


def check_sync(
    args: argparse.Namespace, accelerator: str = "gpu", set_mode: SetMode | None = None
) -> int:
    """Runs A, B and C under a :class:`SyncGuard` in both scopes, plus a positive control.

    Passes when the control raised (the guard is armed and sync debug mode catches a sync) and
    neither lossplug configuration raised in a scope where the baseline did not.
    """
    if set_mode is None:
        set_mode = torch.cuda.set_sync_debug_mode
    shape = QUICK if args.quick else FULL
    max_steps = 4 * LOG_EVERY + LOG_EVERY // 2  # three checked windows, one partial
    loop = Loop(shape, max_steps, "csv")
    plan = [("control", "step")] + [(c, s) for s in ("step", "callbacks") for c in "ABC"]
    rows, outcome, errors_full = [], {}, {}
    for name, scope in plan:
        config = "B" if name == "control" else name
        guard = SyncGuard(scope, LOG_EVERY, set_mode)
        callbacks: list[Any] = [guard, *lossplug_callbacks(config)]
        if name == "control":
            callbacks.append(SyncAtOrdinarySteps(LOG_EVERY))
        trainer = loop.trainer(config, callbacks, accelerator=accelerator)
        module = loop.module(config, released_module(loop.module_class(config), set_mode))
        error = None
        try:
            trainer.fit(module, loop.loader())
        except Exception as exc:  # a sync under "error" mode, or anything else
            error = _where(exc)
            errors_full[(name, scope)] = "".join(
                traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-12)
            )
        finally:
            set_mode("default")
        outcome[(name, scope)] = error
        if name == "control":
            result = "raised (expected)" if error else "**did not raise: the check is blind**"
        else:
            result = "**sync**" if error else "no sync"
        rows.append(
            [
                name,
                CONFIGS.get(name, "B + float(loss) at ordinary steps"),
                scope,
                str(guard.armed_steps),
                result,
                error or "",
            ]
        )
        print(f"  {name} {scope}: {result}", flush=True)
    print()
    head = ["config", "what", "armed from", "steps armed", "result", "first sync (outside torch)"]
    print("\n".join(H.markdown_table(head, rows)))
    failed = [] if outcome[("control", "step")] else ["the control did not raise"]
    judged = [scope for scope in ("step", "callbacks") if not outcome[("A", scope)]]
    for scope in ("step", "callbacks"):
        if scope not in judged:
            print(
                f"- armed from {scope}: the baseline itself syncs, so B and C are not judged here"
            )
            continue
        failed += [f"{c} syncs (armed from {scope})" for c in "BC" if outcome[(c, scope)]]
    if not judged:
        failed.append("inconclusive: the baseline syncs in both scopes")
    for (name, scope), error in outcome.items():
        if error and name != "control":
            print(f"\n{name}, armed from {scope}:\n{errors_full[(name, scope)]}")
    print(f"\n- verdict: {'FAIL: ' + '; '.join(failed) if failed else 'pass'}")
    return 1 if failed else 0


def run_check_sync(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("--check-sync needs a CUDA GPU (torch.cuda.set_sync_debug_mode); none here: skipped")
        return 0
    info = H.machine_info()
    print(
        H.header(
            "lossplug callbacks: host syncs between logging steps (CUDA)",
            info,
            torch.get_num_threads(),
            f"GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}; lightning "
            f"{L.__version__}; logging every {LOG_EVERY} optimizer steps",
        )
    )
    return check_sync(args)


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer steps")
    parser.add_argument("--steps", type=int, help="timed steps per fit (default 30, quick 20)")
    parser.add_argument("--rounds", type=int, help="rounds of all configs (default 15, quick 2)")
    parser.add_argument(
        "--warmup", type=int, default=LOG_EVERY, help="steps dropped at the start of each fit"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--logger", choices=("csv", "none"), default="csv")
    parser.add_argument("--no-plain", action="store_true", help="skip config D")
    parser.add_argument("--json", help="also write every step's times (by part) to this file")
    parser.add_argument(
        "--check-sync", action="store_true", help="check for host syncs on a CUDA GPU instead"
    )
    H.add_load_options(parser)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 2 * LOG_EVERY if args.quick else 3 * LOG_EVERY
    if args.rounds is None:
        args.rounds = 2 if args.quick else 15
    if args.steps < LOG_EVERY or args.steps % LOG_EVERY:
        parser.error(f"--steps must be a positive multiple of {LOG_EVERY}")
    if args.rounds < 1 or args.warmup < 1:
        parser.error("--rounds and --warmup must be >= 1")
    quiet_lightning()
    if args.check_sync:
        return run_check_sync(args)
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
