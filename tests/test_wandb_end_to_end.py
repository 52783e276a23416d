"""Both monitors logging to a real offline W&B run, read back from its file."""

from __future__ import annotations

import math

import pytest
import torch

import lossplug
from _reference import reference_values
from _tiny_lm import NAMESPACES, make_loader, quiet_trainer
from lossplug.kpi import KPI, KPIResult
from lossplug.loggers import read_run, wandb_logger

L, TinyLM, _ = NAMESPACES["lightning.pytorch"]


def window_values(seen):
    return reference_values(seen, shift=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("wandb_e2e")
    torch.manual_seed(0)
    module = TinyLM(record=True)
    logger = wandb_logger("lossplug-e2e", save_dir=root, verbose=False)

    def generations(ctx):
        rows = [{"prompt": f"p{i}", "output": f"o{i}", "score": i / 2} for i in range(3)]
        return KPIResult(0.25 * ctx.step, samples=rows)

    kpis = [
        KPI("pass_rate", generations, every_n_steps=2, target=0.5),
        KPI("cost_usd", lambda ctx: 0.01 * ctx.step, at="validation_end", higher_is_better=False),
    ]
    callbacks = [lossplug.LossMonitor(log_every_n_steps=2), lossplug.KPIMonitor(kpis)]
    # validation after steps 3 and 6, and a one-batch sanity check first that is not logged
    validation = dict(val_check_interval=3, limit_val_batches=2, num_sanity_val_steps=1)
    trainer = quiet_trainer(root, logger, callbacks, max_steps=6, **validation)
    trainer.fit(module, make_loader(6), make_loader(2, seed=9))
    logger.experiment.finish()
    return read_run(root, wait=20.0), module


def test_every_key_at_the_expected_steps_with_float64_values(run):
    data, module = run
    assert data.complete, data.errors
    seen = module.seen["train"]
    for index, step in enumerate([2, 4, 6]):
        want = window_values(seen[2 * index : 2 * index + 2])
        for name in ("cross_entropy", "perplexity", "token_accuracy", "entropy"):
            got = dict(data.series(f"train/{name}"))
            assert math.isclose(got[step], want[name], rel_tol=1e-6), (name, step)
    assert [s for s, _ in data.series("train/perplexity")] == [2, 4, 6]
    tokens = [v for _, v in data.series("train/tokens")]
    assert tokens == sorted(tokens) and tokens[-1] == window_values(seen)["tokens"]
    # validation: one aggregate per run (after steps 3 and 6), sanity-check batch excluded
    val = data.series("val/perplexity")
    assert [s for s, _ in val] == [3, 6]
    val_seen = module.seen["val"][1:]  # the first batch was the sanity check
    assert math.isclose(val[0][1], window_values(val_seen[:2])["perplexity"], rel_tol=1e-6)
    assert math.isclose(val[1][1], window_values(val_seen[2:4])["perplexity"], rel_tol=1e-6)


def test_kpis_beside_the_model_metrics(run):
    data, _ = run
    assert data.series("kpi/pass_rate") == [(2, 0.5), (4, 1.0), (6, 1.5)]
    assert data.series("kpi/pass_rate/reached_at_step") == [(2, 2)]
    assert [s for s, _ in data.series("kpi/cost_usd")] == [3, 6]
    tables = [v for _, v in data.series("kpi/pass_rate/samples")]
    assert len(tables) == 3 and all(t.get("_type") == "table-file" for t in tables)


def test_summaries_and_step_axis_are_declared(run):
    data, _ = run
    metrics = data.metrics
    for key, kind in [
        ("train/perplexity", "min"),
        ("train/cross_entropy", "min"),
        ("train/token_accuracy", "max"),
        ("val/perplexity", "min"),
        ("kpi/pass_rate", "max"),
        ("kpi/cost_usd", "min"),
    ]:
        assert key in metrics, key
        assert metrics[key].step_metric == "trainer/global_step", key
        assert kind in metrics[key].summary, (key, metrics[key].summary)
    assert data.summary["kpi/pass_rate"]["max"] == 1.5
    assert data.summary["val/perplexity"]["min"] == min(v for _, v in data.series("val/perplexity"))


def test_a_resumed_run_holds_every_step_once(tmp_path):
    """Stop at step 4, resume the same W&B run from the checkpoint: no step twice, none missing."""

    def fit(max_steps, ckpt_path=None):
        torch.manual_seed(0)
        logger = wandb_logger(
            "lossplug-resume", save_dir=tmp_path, id="resumeme", resume="allow", verbose=False
        )
        checkpoint = L.callbacks.ModelCheckpoint(
            dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1
        )
        trainer = L.Trainer(
            default_root_dir=tmp_path,
            accelerator="cpu",
            logger=logger,
            callbacks=[lossplug.LossMonitor(log_every_n_steps=3), checkpoint],
            max_steps=max_steps,
            limit_val_batches=0,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(TinyLM(), make_loader(4), ckpt_path=ckpt_path)
        logger.experiment.finish()

    fit(4)
    fit(9, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-resumeme.wandb"))
    assert len(files) == 2  # one file per process; `wandb sync` uploads both into one run
    steps, tokens = [], []
    for path in files:
        part = read_run(path, wait=20.0)
        assert part.complete and part.run_id == "resumeme"
        steps += [step for step, _ in part.series("train/perplexity")]
        tokens += [value for _, value in part.series("train/tokens")]
    assert steps == [3, 4, 6, 9]  # the first fit logs the window it ends inside (step 4)
    assert tokens == sorted(tokens) and len(set(tokens)) == 4


def test_validate_alone_declares_its_summaries_and_logs_each_value_once(tmp_path):
    torch.manual_seed(0)
    module = TinyLM(record=True)
    logger = wandb_logger("lossplug-validate", save_dir=tmp_path, verbose=False)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=logger,
        callbacks=[lossplug.LossMonitor()],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    (results,) = trainer.validate(module, make_loader(3, seed=5))
    logger.experiment.finish()
    data = read_run(tmp_path, wait=20.0)
    want = window_values(module.seen["val"])
    assert [v for _, v in data.series("val/perplexity")] == [pytest.approx(want["perplexity"])]
    assert results["val/perplexity"] == pytest.approx(want["perplexity"])
    assert "min" in data.metrics["val/perplexity"].summary
    assert "last" in data.metrics["val/tokens"].summary
