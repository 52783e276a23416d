"""LossplugCallback: lossplug's exact metrics and KPIs for the Hugging Face ``Trainer``.

Imported by :mod:`lossplug.integrations.transformers` on first use of the name, so that patching
a model never needs ``transformers.trainer_callback`` (nor ``accelerate``, which it pulls in).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, TrainerCallback

from lossplug.kpi._core import KPI
from lossplug.loggers.wandb import define_metric, log_link_table, write_kpi_config
from lossplug.monitoring.clock import CLOCK
from lossplug.monitoring.handoff import keep_inputs_for, models_with_stats, pop_stats_with_inputs
from lossplug.monitoring.keys import METRIC_NAMES, check_metric_names
from lossplug.monitoring.kpis import KPISession, ShowsKPISession
from lossplug.monitoring.links import LinkTable
from lossplug.monitoring.slices import check_slice_by, slice_labels
from lossplug.monitoring.sums import gather_across_processes, single_process
from lossplug.monitoring.tracker import LossTracker

__all__ = ["LossplugCallback"]

#: Where the callback's state lives in ``trainer_state.json`` (``TrainerState.stateful_callbacks``).
#: Not the class name: the Trainer would rebuild a callback of that name from JSON arguments
#: (``restore_callback_states_from_checkpoint``) and the KPI objects cannot be rebuilt that way.
STATE_KEY = "lossplug.LossplugCallback"


class LossplugCallback(TrainerCallback, ShowsKPISession):
    """Exact token-weighted metrics and KPIs in a ``transformers.Trainer``'s own logs.

    At each Trainer logging step, the window since the last one is added to the Trainer's log
    (so to ``trainer.state.log_history`` and to every ``report_to`` integration):
    ``train/cross_entropy``, ``train/perplexity``, ``train/token_accuracy``, ``train/entropy``
    (the ones ``metrics`` names), ``train/tokens`` (cumulative) and ``train/tokens_per_sec``
    (over training time: evaluation and KPI time left out), token-weighted over every
    micro-batch of gradient accumulation and summed over processes. Each evaluation adds
    ``val/…``, the same keys, exact over the whole eval set (``eval_loss`` is a mean of batch
    means). The statistics come from a model patched by
    :func:`~lossplug.integrations.transformers.patch_causal_lm`, which computes them with its
    loss at no extra cost; with an unpatched model the callback says once how to patch it and
    logs its KPIs only.

    KPIs (:class:`~lossplug.KPI`, the built-ins included) run on their schedules as under
    :class:`~lossplug.KPIMonitor`, through :class:`~lossplug.kpi.KPIRunner`: timeouts, error
    isolation, targets, rank-0 execution with the outcome broadcast. ``ctx.model`` is the
    Trainer's model and ``ctx.metrics`` every number logged so far. A step a KPI is due at is
    made a logging step, so its ``kpi/<name>`` lands on that step; ``train_epoch_end`` values go
    with the next log and ``train_end`` values (every cumulative KPI's last total among them)
    with the Trainer's end-of-training log. A KPI never changes the run: see
    :class:`~lossplug.KPIMonitor`, whose guarantees are the same.

    With ``report_to="wandb"`` the values are logged to the W&B run under these names, against
    ``train/global_step`` (the Trainer's own W&B integration would file them under ``train/``,
    as ``train/val/perplexity``). The run's config gets each KPI's description under
    ``lossplug_kpis``, and after each evaluation's KPIs have run (and at the end of training, if
    values came in since) the link between the model and the business is logged as under
    :class:`~lossplug.KPIMonitor`: a ``wandb.Table`` ``link/table`` (``step``,
    ``val/perplexity``, each outcome KPI's values at that evaluation step) and a scatter plot
    ``link/<kpi key>`` per KPI, from rank zero. The callback's sums, token
    count and KPI state are saved in ``trainer_state.json`` with each checkpoint and taken back
    by ``trainer.train(resume_from_checkpoint=...)``.

    Under DDP, an eval set that does not divide evenly among the processes has its last batch
    evened out by ``accelerate`` with repeated samples, and those count twice in ``val/…``: give
    it a size divisible by the global eval batch for exact values.

    Args:
        kpis: the KPIs to run: a list of :class:`~lossplug.KPI` (or a single one).
        metrics: which of ``cross_entropy``, ``perplexity``, ``token_accuracy``, ``entropy``.
        slice_by: also log every evaluation value per slice of the eval data, as
            ``val/<metric>/<slice>`` (and ``val/tokens/<slice>``) beside the overall
            ``val/<metric>``: the name of a key of the batch holding one label per sequence
            (ints, or strings with a data collator that keeps them), or a function
            ``inputs -> labels`` given the named inputs of the model's call. The values are
            exact and token-weighted like the overall one (the slices' sums add up to it) and
            summed over processes. The patched model takes the key out of the call before its
            own forward runs, and shows it in its signature so that the Trainer's
            ``remove_unused_columns`` keeps the column: in the training batches too, so the
            collator must batch it there (string labels break
            ``DataCollatorForLanguageModeling``: use ints, or a function of the inputs). The
            labels are read at each evaluation, and a batch without them fails it when it logs
            (``eval_on_start=True`` checks them before training); ``trainer.predict()`` needs
            none.

    Raises:
        TypeError: ``kpis`` is not a list of KPIs, ``metrics`` is not a sequence of names, or
            ``slice_by`` is neither a key nor a function.
        ValueError: two KPIs share a name, or ``metrics`` is empty, repeats or names an unknown
            metric.

    Example:
        >>> from lossplug.integrations.transformers import LossplugCallback
        >>> callback = LossplugCallback(metrics=("perplexity",))
        >>> callback.keys("val")
        ['val/perplexity', 'val/tokens']
        >>> LossplugCallback(metrics=("perplexity",), slice_by="source").slice_keys("code")
        ['val/perplexity/code', 'val/tokens/code']
    """

    def __init__(
        self,
        kpis: Sequence[KPI] | KPI = (),
        *,
        metrics: Sequence[str] = METRIC_NAMES,
        slice_by: str | Callable[[Any], Any] | None = None,
    ):
        self.session = KPISession(kpis)
        check_slice_by(slice_by)
        self.metrics = check_metric_names(metrics)
        self.slice_by = slice_by
        self.tracker = LossTracker(
            metrics=self.metrics, slice_by=slice_by, check_loss=False, owner="LossplugCallback"
        )
        self._in_eval = False
        # why an evaluation batch could not be split by slice: raised when the evaluation logs,
        # dropped when the batches were trainer.predict()'s (which may lack the slice key)
        self._slice_error: Exception | None = None
        self._expect_train_log = False  # the flow callback asked the Trainer to log this step
        self._due: list[KPI] = []  # train_step KPIs to run at this step's log
        self._pending: dict[str, float] = {}  # KPI values waiting for the next log
        self._known: dict[str, float] = {}  # ctx.metrics: every number logged so far
        self._warned_unpatched = False
        self._placed_in: Any = None
        self._model: Any = None
        self._patched: list[Any] = []
        self._wandb = False  # a W&B integration reports: log to its run under our names
        self._described: Any = None  # the W&B run whose config has the KPI descriptions
        self.links = LinkTable(self.session.kpis)
        self._saved_window: Any = None
        self._restored = False
        self._args: Any = None

    def keys(self, stage: str) -> list[str]:
        """The keys logged for ``stage`` (``"train"`` or ``"val"``), KPIs aside."""
        return self.tracker.keys(stage)

    def slice_keys(self, slice_name: str) -> list[str]:
        """The evaluation keys logged for one slice (``slice_by``)."""
        return self.tracker.slice_keys(slice_name)

    # ---------------------------------------------------------------------------------- hooks
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._place(sys._getframe(1))
        self._see(kwargs.get("model"))  # before any batch: the slice key must reach the patch

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._place(sys._getframe(1))  # added with trainer.add_callback, after __init__
        self._args = args
        CLOCK.release_all()  # an earlier run may have failed inside an evaluation
        self._in_eval = False
        self.session.start()
        self.tracker.start_training()
        self.tracker.window.reset()
        self.tracker.tokens_total = 0  # a callback reused for another trainer.train() restarts
        self.links.clear()
        saved = (state.stateful_callbacks or {}).get(STATE_KEY)
        if saved and not self._restored:
            self._load(saved, is_rank_zero=state.is_world_process_zero)
        self._restored = True
        self._check_patched(kwargs.get("model"))
        self._see(kwargs.get("model"))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._restored = False  # a later trainer.train() starts from its own state

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._collect(kwargs.get("model"), evaluating=False)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._collect(kwargs.get("model"), evaluating=False)
        self._due = self.session.due("train_step", step=state.global_step, epoch=_epoch(state))
        if self._due:
            control.should_log = True  # the KPI's value lands on its own step
        self._expect_train_log = control.should_log
        if control.should_save:
            # the window as the checkpoint will hold it (all ranks reduce it together); a
            # logging step empties it before the save
            will_log = control.should_log and state.global_step > _last_logged(state)
            self._saved_window = None if will_log else self._reduced_window()
            self._stash(state)
        return control

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._in_eval:
            self._in_eval = True
            CLOCK.pause(self)  # evaluation time is not training time
            self.tracker.reset_val()
            self._slice_error = None
            self._check_patched(kwargs.get("model"))
        self._collect(kwargs.get("model"), evaluating=True)

    def on_predict(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._in_eval = False  # trainer.predict() logs nothing: its batches are no evaluation
        CLOCK.resume(self)
        self.tracker.reset_val()
        self._slice_error = None

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._expect_train_log = control.should_log  # logging_strategy="epoch"
        self._run("train_epoch_end", state, kwargs.get("model"))

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs
    ) -> None:
        if logs is None:
            return
        model = kwargs.get("model")
        rank_zero = state.is_world_process_zero
        ours: dict[str, float] = {}
        evaluated = any(key.startswith("eval_") and key.endswith("_runtime") for key in logs)
        evaluated = evaluated or self._in_eval
        ended = False
        if evaluated:  # the log of Trainer.evaluate(): every rank is here
            self._in_eval = False
            CLOCK.resume(self)
            if self._slice_error is not None:  # the next evaluation starts afresh
                error, self._slice_error = self._slice_error, None
                raise error
            ours.update(
                self.tracker.read_val(
                    _all_reduce, _gather_names, is_rank_zero=rank_zero, empty_ok=False
                )
            )
            self._learn(logs, ours)
            self._run("validation_end", state, model)
        elif self._expect_train_log and "loss" in logs and "learning_rate" in logs:
            # the Trainer's training log, on every rank; not a trainer.log() of the user's, which
            # may run on one rank only and would hang the all-reduce
            self._expect_train_log = False
            ours.update(self.tracker.read_window(_all_reduce, is_rank_zero=rank_zero))
            self._learn(logs, ours)
            due, self._due = self._due, []
            self._run_kpis("train_step", due, state, model)
        elif "train_runtime" in logs:  # the Trainer's end-of-training log, on every rank
            ended = True
            # the steps since the last training log, when training ended between two logs
            ours.update(self.tracker.read_window(_all_reduce, is_rank_zero=rank_zero))
            self._learn(logs, ours)
            self._run("train_end", state, model)
        ours.update(self._pending)
        self._pending = {}
        if not ours:
            return
        self._known.update(ours)
        logs.update(ours)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(ours)  # appended before the callbacks ran
        self.links.record(state.global_step, ours)
        if self._wandb and state.is_world_process_zero:
            self._log_to_wandb(ours, state.global_step)
            if evaluated or ended:  # after the KPIs of an evaluation, or of the end of training
                self._log_links(state.global_step, only_if_changed=ended)
        if not self.session.names_known and any(key.startswith("val/") for key in ours):
            self.session.check_lookups(self._known, "after the first evaluation")
        if control.should_save:
            self._stash(state)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._in_eval = False
        CLOCK.resume(self)
        if control.should_save:
            self._stash(state)

    # -------------------------------------------------------------------------------- helpers
    def _place(self, frame: Any) -> None:
        """Move this callback right after the Trainer's flow callback (whose ``on_step_end``
        decides the logging steps) and before the other ``report_to`` integrations, which the
        Trainer puts before the user's callbacks: they then get the values this callback adds to
        each log."""
        handler = frame.f_locals.get("self")  # the frame of CallbackHandler.call_event
        if not isinstance(handler, CallbackHandler) or handler is self._placed_in:
            return
        self._placed_in = handler  # once per Trainer: the same callback may serve several
        callbacks = handler.callbacks
        callbacks.remove(self)
        # The Trainer's W&B integration files every key not starting with eval_ under train/
        # (train/val/perplexity): this callback goes after it and logs to the W&B run itself
        self._wandb = any(_is_wandb(cb) for cb in callbacks)
        after = [
            i
            for i, cb in enumerate(callbacks)
            if isinstance(cb, DefaultFlowCallback) or _is_wandb(cb)
        ]
        callbacks.insert(after[-1] + 1 if after else 0, self)

    def _check_patched(self, model: Any) -> None:
        if self._warned_unpatched or model is None or models_with_stats(model):
            return
        self._warned_unpatched = True
        warnings.warn(
            f"LossplugCallback: the Trainer's model ({type(model).__name__}) is not patched, so "
            "no train/ or val/ metrics can be logged (only KPIs): call "
            "lossplug.integrations.transformers.patch_causal_lm(model) before building the "
            "Trainer; the patched model computes them with its loss, at no extra cost",
            UserWarning,
            stacklevel=3,
        )

    def _see(self, model: Any) -> None:
        """Find the patched models in ``model`` (once per model, not at every micro-batch) and
        tell them what ``slice_by`` needs."""
        if model is None or model is self._model:
            return
        self._model, self._patched = model, models_with_stats(model)
        keep_inputs_for(self._patched, self.slice_by)

    def _collect(self, model: Any, *, evaluating: bool) -> None:
        # taken after every forward with labels: the patch keeps only the last call's stats
        if model is None:
            return
        self._see(model)
        for stats, inputs in pop_stats_with_inputs(self._patched):
            if not evaluating:
                self.tracker.add_train(stats.sum())
                continue
            labels = None
            if self.slice_by is not None and self._slice_error is None:
                try:
                    labels = self._slice_labels(stats, inputs)
                except Exception as error:  # raised with the evaluation's log, not by predict()
                    self._slice_error = error
            self.tracker.add_val(stats, labels)

    def _slice_labels(self, stats: Any, inputs: Mapping[str, Any] | None) -> Any:
        if inputs is None:
            raise RuntimeError(
                "LossplugCallback(slice_by=...) met an evaluation batch that the model ran "
                "before the callback could tell it to keep the slice labels: give the callback "
                "to Trainer(callbacks=[...]) or add it before trainer.train()"
            )
        try:
            return slice_labels(self.slice_by, inputs, stats.shape, owner="LossplugCallback")
        except KeyError as error:
            raise KeyError(
                f"{error.args[0]}. The Trainer's data collator drops a key it cannot batch "
                "(transformers' default collator drops strings: use int labels or a collator "
                "that keeps them), and its column filter drops a dataset column the model does "
                "not take when the callback is added after the Trainer is built "
                "(remove_unused_columns=False keeps it)"
            ) from None

    def _learn(self, logs: Mapping[str, Any], ours: Mapping[str, float]) -> None:
        """Keep every number logged so far: what KPIs see as ``ctx.metrics``."""
        for key, value in logs.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._known[key] = float(value)
        self._known.update(ours)

    def _run(self, event: str, state: Any, model: Any) -> None:
        due = self.session.due(event, step=state.global_step, epoch=_epoch(state))
        self._run_kpis(event, due, state, model)

    def _run_kpis(self, event: str, due: list[KPI], state: Any, model: Any) -> None:
        world = _world_size()
        outcomes = self.session.run(
            event,
            due,
            step=state.global_step,
            epoch=_epoch(state),
            model=model,
            metrics=self._known,
            is_rank_zero=state.is_world_process_zero,
            broadcast=_broadcast if world > 1 else None,
            device=_device(model),
            tokens=self.tracker.tokens_total or None,
            samples=self._samples(state),
            world_size=world,
        )
        for _, outcome in outcomes:
            self._pending.update(outcome.metrics)

    def _log_to_wandb(self, metrics: Mapping[str, float], step: int) -> None:
        import wandb

        run = wandb.run
        if run is None:
            return
        if run is not self._described:
            self._described = run
            write_kpi_config(run, self.session.describe(), writer="LossplugCallback")
        summaries = self.session.summaries(k for k in metrics if k.startswith("kpi/"))
        summaries.update(self.tracker.new_summaries(k for k in metrics if not k.startswith("kpi/")))
        for key, summary in summaries.items():
            define_metric(run, key, summary=summary, step_key="train/global_step")
        # the Trainer's W&B integration plots everything against train/global_step
        run.log({**metrics, "train/global_step": step})

    def _log_links(self, step: int, *, only_if_changed: bool) -> None:
        """Log the link table and its scatter plots to the W&B run, on the Trainer's x-axis."""
        import wandb

        run = wandb.run
        if run is None or getattr(run, "disabled", False):
            return

        def write(columns: list[str], rows: list[list[Any]], kpi_keys: list[str]) -> None:
            log_link_table(
                run,
                columns,
                rows,
                kpi_keys,
                step,
                x_key=self.links.x_key,
                step_key="train/global_step",
            )

        self.links.publish(write, step=step, only_if_changed=only_if_changed)

    def _samples(self, state: Any) -> int | None:
        """Training samples seen on all ranks, as the Trainer counts them (full batches)."""
        args = self._args
        if args is None:
            return None
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
        return state.global_step * per_step * max(args.world_size, 1)

    def _reduced_window(self) -> list[float] | None:
        """The window's sums over every process (a collective), as the checkpoint keeps them."""
        if self.tracker.window.sums is None and _world_size() <= 1:
            return None
        return self.tracker.saved_window(_all_reduce).tolist()

    def _stash(self, state: Any) -> None:
        """Put the state in ``trainer_state.json``, which the Trainer writes with a checkpoint."""
        if state.stateful_callbacks is None:
            state.stateful_callbacks = {}
        state.stateful_callbacks[STATE_KEY] = {
            "version": 1,
            "tokens_total": self.tracker.tokens_total,
            "window": self._saved_window,
            "runner": self.session.state_dict(),
            "links": self.links.state_dict(),
        }

    def _load(self, saved: Mapping[str, Any], *, is_rank_zero: bool) -> None:
        # the saved window is the sum over ranks: one rank takes it back
        self.tracker.load_state_dict(saved, is_rank_zero=is_rank_zero)
        self.session.load_state_dict(saved.get("runner", {}))
        self.links.load_state_dict(saved.get("links", {}))


def _epoch(state: Any) -> int:
    """The epoch, counted from 0: ``state.epoch`` runs over ``(e, e + 1]`` during epoch ``e``."""
    return max(math.ceil(state.epoch or 0) - 1, 0)


def _last_logged(state: Any) -> int:
    steps = [row.get("step", -1) for row in state.log_history if "loss" in row]
    return steps[-1] if steps else 0


def _world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _collective_device() -> torch.device:
    # NCCL needs CUDA tensors, gloo CPU ones
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes (identity on one); every process must call it together."""
    if _world_size() <= 1:
        return tensor
    tensor = tensor.to(_collective_device())
    torch.distributed.all_reduce(tensor)
    return tensor


def _gather_names(names: list[str]) -> list[list[str]]:
    """Every process's list of names (identity on one); every process must call it together."""
    return single_process(names) if _world_size() <= 1 else gather_across_processes(names)


def _broadcast(obj: Any) -> Any:
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _is_wandb(callback: Any) -> bool:
    return type(callback).__name__ == "WandbCallback"
