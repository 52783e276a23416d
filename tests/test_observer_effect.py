"""lossplug never changes the run it measures: the same final weights, bit for bit, with its
callbacks and KPIs (sampling, reseeding, raising, running late) as without them."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lossplug
from _tiny_lm import VOCAB, Recorder, make_tokens, quiet_trainer
from lossplug.kpi import KPI, KPIContext, KPIRunner
from lossplug.kpi._isolation import KPICancelled, stop_hook_installed


def _logits(output):
    """The logits of a Lightning module's output (a tensor) or a Hugging Face model's."""
    return output if isinstance(output, torch.Tensor) else output.logits


def observing_kpis(vocab: int, late_call, *, every: tuple[int, int, int, int]) -> list[KPI]:
    """Four KPIs that would each change the run if lossplug let them: one samples, one reseeds
    (on the training thread), one raises, one runs past its time limit calling the model."""
    sample_every, reseed_every, raise_every, late_every = every

    def samples(ctx: KPIContext) -> float:
        tokens = torch.randint(0, vocab, (2, 5))
        probs = torch.softmax(_logits(ctx.model(tokens))[:, -1].float(), dim=-1)
        picked = torch.multinomial(probs, 4, replacement=True).float().mean()
        return float(picked) + torch.randn(()).item() + random.random() + float(np.random.rand())

    def reseeds(ctx: KPIContext) -> float:
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        return 1.0

    def raises(ctx: KPIContext) -> float:
        raise RuntimeError("no answer yet")

    def runs_late(ctx: KPIContext) -> float:
        while True:  # until stopped at a model call
            late_call(ctx.model, torch.randint(0, vocab, (2, 4)))

    return [
        KPI("samples", samples, every_n_steps=sample_every, timeout_s=30),
        KPI("reseeds", reseeds, every_n_steps=reseed_every, timeout_s=None),
        KPI("raises", raises, every_n_steps=raise_every),
        KPI("late", runs_late, every_n_steps=late_every, timeout_s=0.3),
    ]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    named_a, named_b = dict(a.named_parameters()), dict(b.named_parameters())
    assert named_a.keys() == named_b.keys()
    differ = [name for name in named_a if not torch.equal(named_a[name], named_b[name])]
    assert not differ, f"parameters differ: {differ}"


# --------------------------------------------------------------------------------- Lightning
class DropoutLM(L.LightningModule):
    """A bigram model with dropout, trained with AdamW: every random draw shows in its weights."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(32, VOCAB)
        self.losses: list[torch.Tensor] = []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.embed(tokens)))

    def training_step(self, batch, batch_idx):
        (rows,) = batch
        seq = rows.shape[1] // 2
        loss, stats = lossplug.cross_entropy(
            self(rows[:, :seq]), rows[:, seq:], shift=True, return_stats=True
        )
        self.losses.append(loss.detach().clone())
        return {"loss": loss, "stats": stats}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def fit_lightning(tmp_path, callbacks, *, max_steps: int = 24):
    L.seed_everything(0, verbose=False)
    module = DropoutLM()
    recorder = Recorder()
    trainer = quiet_trainer(tmp_path, recorder, callbacks, max_steps=max_steps, limit_val_batches=0)
    # 8 batches an epoch: the reshuffles after KPIs ran draw from the training streams
    loader = DataLoader(TensorDataset(make_tokens(32, 12, seed=3)), batch_size=4, shuffle=True)
    with warnings.catch_warnings():
        # Lightning's advice on workers and logging; what lossplug says is tested where it counts
        warnings.filterwarnings("ignore", module="lightning")
        trainer.fit(module, loader)
    return trainer, module, recorder


def test_lightning_run_is_bit_identical_with_lossplug_and_its_kpis(tmp_path):
    kpis = observing_kpis(VOCAB, lambda model, tokens: model(tokens), every=(3, 4, 5, 8))
    observed = [lossplug.LossMonitor(), lossplug.KPIMonitor(kpis)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what the raising and the late KPIs do is warned
        trainer, module, recorder = fit_lightning(tmp_path / "with", observed)
    _, alone, _ = fit_lightning(tmp_path / "without", [])

    assert trainer.global_step == 24
    assert_same_weights(module, alone)
    assert len(module.losses) == len(alone.losses) == 24
    assert all(torch.equal(a, b) for a, b in zip(module.losses, alone.losses, strict=True))
    # every KPI did run, and did what it does
    assert [step for step, _ in recorder.series("kpi/samples")] == [3, 6, 9, 12, 15, 18, 21, 24]
    assert [step for step, _ in recorder.series("kpi/reseeds")] == [4, 8, 12, 16, 20, 24]
    assert recorder.series("kpi/raises/errors") == [(5, 1.0), (10, 2.0), (15, 3.0), (20, 4.0)]
    # each late call was stopped, so the next one ran (a call still running would be skipped)
    assert recorder.series("kpi/late/timeouts") == [(8, 1.0), (16, 2.0), (24, 3.0)]
    assert all(0.3 <= seconds < 3 for _, seconds in recorder.series("kpi/late/seconds"))
    assert not stop_hook_installed()  # training's module calls pay nothing for it


# ------------------------------------------------------------------------------ transformers
def fit_hf(tmp_path, callbacks):
    transformers = pytest.importorskip("transformers")
    from lossplug.integrations.transformers import patch_causal_lm

    config = transformers.GPT2Config(
        vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32
    )  # dropout left on
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    patch_causal_lm(model)
    ids = torch.randint(0, 64, (32, 12), generator=torch.Generator().manual_seed(1))
    rows = [{"input_ids": row, "labels": row.clone()} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=4,
        logging_steps=2,
        learning_rate=5e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer


def test_transformers_run_is_bit_identical_with_lossplug_and_its_kpis(tmp_path):
    pytest.importorskip("transformers")
    from lossplug.integrations.transformers import LossplugCallback

    def generate(model, tokens):
        model.generate(tokens, do_sample=True, max_new_tokens=6, pad_token_id=0)

    # KPIs on logging steps only, so that both runs log their loss at the same steps
    kpis = observing_kpis(64, generate, every=(2, 4, 6, 6))
    observed = fit_hf(tmp_path / "with", [LossplugCallback(kpis)])
    alone = fit_hf(tmp_path / "without", [])

    assert observed.state.global_step == 12
    assert_same_weights(observed.model, alone.model)
    losses = [(row["step"], row["loss"]) for row in observed.state.log_history if "loss" in row]
    assert len(losses) == 6
    assert losses == [
        (row["step"], row["loss"]) for row in alone.state.log_history if "loss" in row
    ]
    logged = {key for row in observed.state.log_history for key in row}
    assert {"kpi/samples", "kpi/reseeds", "kpi/raises/errors", "kpi/late/timeouts"} <= logged
    late = [
        row["kpi/late/seconds"] for row in observed.state.log_history if "kpi/late/timeouts" in row
    ]
    # the first late call was stopped, so the second one ran (a call still running is skipped)
    assert len(late) == 2 and all(0.3 <= seconds < 3 for seconds in late)
    assert not stop_hook_installed()


# ------------------------------------------------------------------------------------ runner
class WithFrozenPart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trained = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
        self.frozen = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
        self.frozen.eval()  # e.g. a teacher, or a frozen encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.trained(x))


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


@pytest.mark.parametrize("timeout_s", [None, 0.3], ids=["inline", "late"])
def test_each_module_gets_its_own_mode_back_once_the_kpi_has_ended(timeout_s):
    model = WithFrozenPart()
    before = modes(model)
    seen: list[dict[str, bool]] = []

    def looks(ctx: KPIContext) -> float:
        ctx.model.frozen.train()  # a KPI may switch modes too
        while True:
            seen.append(modes(ctx.model))
            ctx.model(torch.ones(1, 4))
            if timeout_s is None:
                return 1.0

    runner = KPIRunner([KPI("looks", looks, every_n_steps=1, timeout_s=timeout_s)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = runner.run(runner.kpis[0], KPIContext(step=1, model=model))
    assert outcome.status == ("ok" if timeout_s is None else "timeout")
    assert modes(model) == before  # the frozen part stays in eval mode
    assert seen and not seen[0]["trained"] and not seen[0][""]  # eval mode during the call
    count = len(seen)
    time.sleep(0.2)
    assert len(seen) == count  # the late call no longer runs: no one saw the modes come back
    assert not stop_hook_installed()


def test_a_late_kpi_that_catches_the_cancellation_is_stopped_at_its_next_model_call():
    model = nn.Linear(3, 3)
    got: list[str] = []

    def catches_then_ends(ctx: KPIContext) -> float:
        try:
            while True:
                ctx.model(torch.ones(1, 3))
        except Exception:  # not enough: the cancellation is no Exception
            got.append("exception")
        except BaseException as exc:
            got.append(type(exc).__name__)
        return 1.0

    runner = KPIRunner([KPI("stubborn", catches_then_ends, every_n_steps=1, timeout_s=0.2)])
    started = time.perf_counter()
    with pytest.warns(RuntimeWarning, match=r"ran past timeout_s=0.2 at step 1 and was stopped"):
        outcome = runner.run(runner.kpis[0], KPIContext(step=1, model=model))
    assert time.perf_counter() - started < 2.0
    assert outcome.status == "timeout" and outcome.metrics["kpi/stubborn/timeouts"] == 1.0
    assert got == [KPICancelled.__name__]
    assert not stop_hook_installed()
    # the call has ended, so the next one runs (a live one would be skipped as busy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert runner.run(runner.kpis[0], KPIContext(step=2, model=model)).status == "timeout"


def test_a_late_kpi_that_swallows_the_cancellation_and_calls_again_is_held_for_good():
    model = nn.Linear(3, 3)
    got: list[str] = []

    def swallows(ctx: KPIContext) -> float:
        while True:
            try:
                ctx.model(torch.ones(1, 3))
            except BaseException as exc:  # every cancellation swallowed
                got.append(type(exc).__name__)

    runner = KPIRunner([KPI("swallows", swallows, every_n_steps=1, timeout_s=0.2)])
    started = time.perf_counter()
    with pytest.warns(RuntimeWarning, match=r"caught .*held there for good") as caught:
        outcome = runner.run(runner.kpis[0], KPIContext(step=1, model=model))
    # held at its next model call: training waits no grace for it
    assert time.perf_counter() - started < 2.0
    assert not [w for w in caught if "could not be stopped" in str(w.message)]
    assert outcome.status == "timeout" and outcome.metrics["kpi/swallows/timeouts"] == 1.0
    assert got == [KPICancelled.__name__]  # one cancellation; the next call never returned
    assert not stop_hook_installed()  # nothing left for training's module calls to pay for
    held = runner._running["swallows"]
    assert held.held and held.is_alive()
    time.sleep(0.1)
    assert got == [KPICancelled.__name__]  # it runs no more
    # skipped from now on, counted as a timeout
    outcome = runner.run(runner.kpis[0], KPIContext(step=2, model=model))
    assert outcome.status == "busy" and outcome.metrics["kpi/swallows/timeouts"] == 2.0


def test_a_late_kpi_that_never_calls_the_model_is_warned_about_and_training_finishes(tmp_path):
    first_start: list[float] = []
    done = threading.Event()

    def python_loop(ctx: KPIContext) -> float:
        first_start.append(time.perf_counter())
        # ends when the test is over (at most 60 s): late, and it never calls the model
        while not done.is_set() and time.perf_counter() - first_start[0] < 60:
            sum(range(1000))
        return 1.0

    monitor = lossplug.KPIMonitor([KPI("loop", python_loop, every_n_steps=2, timeout_s=0.2)])
    monitor.runner.stop_grace_s = 0.2
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer, _, recorder = fit_lightning(tmp_path, [monitor], max_steps=6)
        assert trainer.global_step == 6
        loud = [str(w.message) for w in caught if "could not be stopped" in str(w.message)]
        assert len(loud) == 1 and "THE RUN MAY BE PERTURBED" in loud[0]
        assert "ran past timeout_s=0.2 at step 2" in loud[0]
        # skipped while it still runs; counted as timeouts all the same
        assert [s for s, _ in recorder.series("kpi/loop/timeouts")] == [2, 4, 6]
        assert len(first_start) == 1
    finally:
        done.set()
        thread = monitor.runner._running.get("loop")
        if thread is not None:
            thread.join(10)
    assert not stop_hook_installed()  # gone with the last KPI thread


FOREVER = {
    "calls_the_model": """
            def forever(ctx):
                x = torch.randn(256, 512)
                while True:
                    ctx.model(x)
    """,
    # catches every cancellation around its model calls, torch work in between
    "swallows_the_cancellation": """
            def forever(ctx):
                while True:
                    try:
                        ctx.model(torch.randn(256, 512))
                    except BaseException:
                        pass
    """,
}


@pytest.mark.parametrize("kind", sorted(FOREVER))
def test_the_process_exits_cleanly_after_a_late_kpi_that_was_using_the_model(kind, tmp_path):
    script = tmp_path / "late_kpi.py"
    script.write_text(
        textwrap.dedent(
            """
            import warnings

            import lightning.pytorch as L
            import torch
            from torch.utils.data import DataLoader, TensorDataset

            import lossplug

            class Wide(L.LightningModule):
                def __init__(self):
                    super().__init__()
                    self.layer = torch.nn.Linear(512, 512)

                def forward(self, x):
                    return self.layer(x)

                def training_step(self, batch, batch_idx):
                    return self(batch[0]).pow(2).mean()

                def configure_optimizers(self):
                    return torch.optim.SGD(self.parameters(), lr=1e-3)

            {forever}
            warnings.simplefilter("ignore")
            kpi = lossplug.KPI("forever", forever, every_n_steps=2, timeout_s=0.5)
            trainer = L.Trainer(
                accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False,
                callbacks=[lossplug.KPIMonitor([kpi])],
            )
            data = DataLoader(TensorDataset(torch.randn(16, 512)), batch_size=4)
            trainer.fit(Wide(), data)
            print("fit done")
            """
        ).replace("{forever}", textwrap.dedent(FOREVER[kind]))
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert "terminate called" not in done.stderr
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fit done" in done.stdout
