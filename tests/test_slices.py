"""Per-slice validation metrics: per-sequence statistics from the ops, exact per-slice values in a
real Trainer (one process, two gloo ranks with different slices, resume) and in W&B."""

from __future__ import annotations

import math

import pytest
import torch

import lossplug
from _ddp_worker import batch_sources, make_batches
from _ddp_worker import run as ddp_run
from _reference import reference_cross_entropy
from _tiny_lm import (
    NAMESPACES,
    CloseProcessGroup,
    SlicedShards,
    logged_at,
    make_tokens,
    quiet_trainer,
    sliced_batches,
    tiny_sizes,
)
from lossplug.callbacks.loss_monitor import slice_labels
from lossplug.monitoring.sums import SliceAccumulator

NAMES = ("cross_entropy", "perplexity", "token_accuracy", "entropy")
L, TinyLM, Recorder = NAMESPACES["lightning.pytorch"]


def reference_by_slice(seen, sources) -> dict[str, dict[str, float]]:
    """Float64 values per slice, one sequence at a time, independent of lossplug."""
    sums: dict[str, dict[str, float]] = {}
    for (logits, labels), names in zip(seen, sources, strict=True):
        for row, name in enumerate(names):
            _, stats = reference_cross_entropy(logits[row], labels[row], shift=True)
            total = sums.setdefault(name, dict.fromkeys(("nll", "tokens", "correct", "ent"), 0.0))
            total["nll"] += stats["nll_sum"].item()
            total["tokens"] += stats["tokens"].item()
            total["correct"] += stats["correct"].item()
            total["ent"] += stats["entropy_sum"].item()
    return {
        name: {
            "cross_entropy": s["nll"] / s["tokens"],
            "perplexity": math.exp(s["nll"] / s["tokens"]),
            "token_accuracy": s["correct"] / s["tokens"],
            "entropy": s["ent"] / s["tokens"],
            "tokens": s["tokens"],
        }
        for name, s in sums.items()
    }


# --------------------------------------------------------------------------------- the ops
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_per_sequence_stats_equal_a_float64_reference_per_sequence(shift, dtype):
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 7, 13).to(dtype)
    labels = torch.randint(0, 13, (3, 2, 7))
    labels[0, 1] = -100  # a sequence with no scored token
    labels[2, 0, :3] = -100
    loss, stats = lossplug.cross_entropy(
        logits, labels, shift=shift, return_stats=True, per_sequence_stats=True
    )
    plain_loss, plain = lossplug.cross_entropy(logits, labels, shift=shift, return_stats=True)
    assert tuple(stats.shape) == (3, 2)
    assert torch.equal(loss, plain_loss)  # the loss does not change
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-5, torch.float64: 1e-12}[dtype]
    for i in range(3):
        for j in range(2):
            _, want = reference_cross_entropy(logits[i, j], labels[i, j], shift=shift)
            assert int(stats.tokens[i, j]) == int(want["tokens"])
            assert int(stats.correct[i, j]) == int(want["correct"])
            for field in ("nll_sum", "entropy_sum"):
                got, ref = float(getattr(stats, field)[i, j]), float(want[field])
                assert math.isclose(got, ref, rel_tol=tol, abs_tol=tol), (field, i, j)
    total = stats.sum()
    assert int(total.tokens) == int(plain.tokens) and int(total.correct) == int(plain.correct)
    assert math.isclose(float(total.nll_sum), float(plain.nll_sum), rel_tol=1e-12)


def test_linear_cross_entropy_gives_the_same_per_sequence_stats():
    torch.manual_seed(1)
    hidden = torch.randn(4, 6, 8, requires_grad=True)
    weight = torch.randn(19, 8, requires_grad=True)
    labels = torch.randint(0, 19, (4, 6))
    labels[1] = -100
    loss, stats = lossplug.linear_cross_entropy(
        hidden, weight, labels, shift=True, return_stats=True, per_sequence_stats=True
    )
    loss.backward()  # the gradient path gives them too
    _, want = lossplug.cross_entropy(
        hidden.detach() @ weight.detach().T,
        labels,
        shift=True,
        return_stats=True,
        per_sequence_stats=True,
    )
    assert stats.tokens.tolist() == want.tokens.tolist() == [5, 0, 5, 5]
    assert torch.allclose(stats.nll_sum, want.nll_sum, rtol=1e-5)
    assert torch.equal(stats.correct, want.correct)


def test_per_sequence_stats_refuse_a_target_without_a_sequence_axis():
    with pytest.raises(ValueError, match="per_sequence_stats=True needs a sequence axis"):
        lossplug.cross_entropy(
            torch.randn(5), torch.tensor(2), return_stats=True, per_sequence_stats=True
        )
    with pytest.raises(TypeError, match="per_sequence_stats must be True or False, got 1"):
        lossplug.cross_entropy(torch.randn(2, 5), torch.tensor([1, 2]), per_sequence_stats=1)


def test_sum_by_adds_sequences_per_group_and_checks_its_index():
    logits, labels = torch.zeros(4, 3, 6), torch.tensor([[1, 2, -100]] * 4)
    _, stats = lossplug.cross_entropy(logits, labels, return_stats=True, per_sequence_stats=True)
    grouped = stats.sum_by(torch.tensor([2, 0, 2, 2]), 3)
    assert grouped.tokens.tolist() == [2, 0, 6]
    assert torch.allclose(grouped.perplexity[[0, 2]], torch.full((2,), 6.0, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"index.shape \(3,\) must equal the stats' shape \(4,\)"):
        stats.sum_by(torch.tensor([0, 1, 2]), 3)
    with pytest.raises(TypeError, match="index must be an integer tensor"):
        stats.sum_by(torch.zeros(4), 1)


# ----------------------------------------------------------------------- the framework core
def test_slice_accumulator_unions_names_across_ranks_and_keeps_int_labels_on_the_device():
    torch.manual_seed(2)
    logits = torch.randn(4, 5, 9)
    labels = torch.randint(0, 9, (4, 5))
    _, stats = lossplug.cross_entropy(logits, labels, return_stats=True, per_sequence_stats=True)
    rank0, rank1 = SliceAccumulator(), SliceAccumulator()
    rank0.add(stats, ["a", "b", "a", "b"])
    rank1.add(stats, torch.tensor([3, 3, 7, 3]))  # ints: kept as a tensor until read
    assert rank1.names == [] and len(rank1._pending) == 1
    names = {0: list(rank0.names), 1: []}
    got = rank0.read(reduce=lambda t: t, gather=lambda mine: [mine, ["7", "3"]])
    assert sorted(got) == ["3", "7", "a", "b"]  # the union, sorted: every rank agrees
    assert got["3"]["tokens"] == 0 and "perplexity" not in got["3"]  # only on the other rank
    per_row = [float(v) for v in stats.nll_sum]
    assert math.isclose(got["a"]["cross_entropy"], (per_row[0] + per_row[2]) / 10, rel_tol=1e-12)
    got1 = rank1.read(reduce=lambda t: t, gather=lambda mine: [names[0], mine])
    assert got1["3"]["tokens"] == 15 and got1["7"]["tokens"] == 5 and got1["a"]["tokens"] == 0


def test_slice_accumulator_groups_many_int_batches_without_growing():
    acc = SliceAccumulator()
    _, stats = lossplug.cross_entropy(
        torch.zeros(2, 3, 4),
        torch.ones(2, 3, dtype=torch.long),
        return_stats=True,
        per_sequence_stats=True,
    )
    for _ in range(SliceAccumulator.MAX_PENDING + 5):
        acc.add(stats, torch.tensor([0, 1]))
    assert len(acc._pending) == 5 and acc.names == ["0", "1"]
    got = acc.read(reduce=lambda t: t, gather=lambda mine: [mine])
    assert got["0"]["tokens"] == got["1"]["tokens"] == 3 * (SliceAccumulator.MAX_PENDING + 5)


@pytest.mark.parametrize(
    ("slice_by", "batch", "error", "pattern"),
    [
        ("source", (torch.zeros(2),), TypeError, "reads a key of a dict batch"),
        ("source", {"rows": 1, "task": 2}, KeyError, r"no key 'source' \(its keys: \['rows'"),
        ("source", {"source": ["a"]}, ValueError, "gave 1 labels, but .* 2 sequences"),
        ("source", {"source": "ab"}, TypeError, "must give a sequence of labels"),
        ("source", {"source": ["a", 1.5]}, TypeError, "labels must be str or int, got 1.5"),
        ("source", {"source": ["a", True]}, TypeError, "labels must be str or int, got True"),
        ("source", {"source": ["a", "x/y"]}, ValueError, "label 'x/y' cannot name a slice"),
        ("source", {"source": ["a", ""]}, ValueError, "label '' cannot name a slice"),
        ("source", {"source": torch.tensor([0.5, 1.0])}, TypeError, "dtype torch.float32"),
        (lambda b: b["k"], {"k": [1, 2, 3]}, ValueError, r"slice_by\(batch\) gave 3 labels"),
    ],
)
def test_slice_labels_name_what_is_wrong(slice_by, batch, error, pattern):
    with pytest.raises(error, match=pattern):
        slice_labels(slice_by, batch, torch.Size([2]))


def test_slice_labels_accept_names_ints_and_tensors():
    assert slice_labels("s", {"s": ["code", 3]}, torch.Size([2])) == ["code", "3"]
    assert torch.equal(
        slice_labels("s", {"s": torch.tensor([4, 5])}, torch.Size([2])), torch.tensor([4, 5])
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(slice_by=3), TypeError, "slice_by must be None, the name of a batch key"),
        (dict(slice_by=""), ValueError, "slice_by must name a key of the batch"),
        (dict(slice_by="source", stages=("train",)), ValueError, "has no 'val'"),
    ],
)
def test_bad_slice_by_is_refused_at_construction(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        lossplug.LossMonitor(**kwargs)


# ---------------------------------------------------------------------------- in a Trainer
VAL_SOURCES = [["code", "prose"], ["prose"], ["code", "prose", "math"]]


@pytest.mark.parametrize("mode", ["sequence_stats", "logits"])
@pytest.mark.parametrize("key", ["source", "task"])
def test_per_slice_validation_values_equal_a_float64_reference(mode, key, tmp_path):
    torch.manual_seed(0)
    module, recorder = TinyLM(mode=mode, record=True), Recorder()
    batches = sliced_batches(VAL_SOURCES)
    slice_by = key if key == "source" else (lambda batch: batch["task"])
    monitor = lossplug.LossMonitor(slice_by=slice_by, log_every_n_steps=1, shift=mode == "logits")
    trainer = quiet_trainer(
        tmp_path, recorder, [monitor], max_steps=2, val_check_interval=2, limit_val_batches=3
    )
    train = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(make_tokens(8, 10, seed=1)), batch_size=4
    )
    trainer.fit(module, train, torch.utils.data.DataLoader(batches, batch_size=None))
    names = [
        b["source"] if key == "source" else [str(len(n)) for n in b["source"]] for b in batches
    ]
    want = reference_by_slice(module.seen["val"], names)
    row = logged_at(recorder, 2)
    assert sorted(want) == (["4", "5"] if key == "task" else ["code", "math", "prose"])
    for name, values in want.items():
        for metric in (*NAMES, "tokens"):
            got = row[f"val/{metric}/{name}"]
            assert math.isclose(got, values[metric], rel_tol=1e-6, abs_tol=1e-9), (name, metric)
    # the slices add up to the overall value, token for token
    assert sum(row[f"val/tokens/{name}"] for name in want) == row["val/tokens"]
    nll = sum(row[f"val/cross_entropy/{n}"] * row[f"val/tokens/{n}"] for n in want)
    assert math.isclose(nll / row["val/tokens"], row["val/cross_entropy"], rel_tol=1e-9)
    assert f"val/perplexity/{sorted(want)[0]}" in trainer.callback_metrics  # monitorable


def test_whole_batch_stats_cannot_be_split_and_fail_at_the_sanity_check(tmp_path):
    torch.manual_seed(0)
    module = TinyLM(mode="stats")
    trainer = quiet_trainer(
        tmp_path,
        Recorder(),
        [lossplug.LossMonitor(slice_by="source")],
        max_steps=1,
        num_sanity_val_steps=1,
    )
    train = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(make_tokens(4, 10, seed=1)), batch_size=4
    )
    val = torch.utils.data.DataLoader(sliced_batches(VAL_SOURCES), batch_size=None)
    with pytest.raises(ValueError, match="per_sequence_stats=True"):
        trainer.fit(module, train, val)
    assert trainer.global_step == 0  # before the first training step


def test_two_gloo_ranks_with_different_slices_equal_one_process(tmp_path):
    # lr=0: the weights stay fixed, so both runs score the same sequences with the same model
    val_by_rank = [[["a", "b"], ["a"]], [["b", "c"], ["c", "c", "b"]]]
    csv_logger = L.loggers.CSVLogger(tmp_path, name="ddp", version=0)
    torch.manual_seed(0)
    ddp = quiet_trainer(
        tmp_path,
        csv_logger,
        [lossplug.LossMonitor(slice_by="source", shift=True), CloseProcessGroup()],
        max_steps=2,
        val_check_interval=2,
        devices=2,
        strategy="ddp_spawn",
        use_distributed_sampler=False,
    )
    ddp.fit(TinyLM(mode="logits", lr=0.0), datamodule=SlicedShards(16, 2, val_by_rank))
    import csv

    logged: dict[str, float] = {}
    with open(tmp_path / "ddp" / "version_0" / "metrics.csv") as handle:
        for record in csv.DictReader(handle):
            logged.update({k: float(v) for k, v in record.items() if v not in ("", None)})

    torch.manual_seed(0)
    module, recorder = TinyLM(mode="logits", lr=0.0, record=True), Recorder()
    single = quiet_trainer(
        tmp_path,
        recorder,
        [lossplug.LossMonitor(slice_by="source", shift=True)],
        max_steps=2,
        val_check_interval=2,
    )
    single.fit(module, datamodule=SlicedShards(16, 4, val_by_rank))
    batches = sliced_batches([s for rank in val_by_rank for s in rank])
    want = reference_by_slice(module.seen["val"], [b["source"] for b in batches])
    assert sorted(want) == ["a", "b", "c"]  # "a" only on rank 0, "c" only on rank 1
    single_row = logged_at(recorder, 2)
    for name, values in want.items():
        for metric in (*NAMES, "tokens"):
            key = f"val/{metric}/{name}"
            assert math.isclose(logged[key], values[metric], rel_tol=1e-6), key
            assert math.isclose(single_row[key], values[metric], rel_tol=1e-6), key


def test_resume_gives_the_same_per_slice_values_and_keeps_the_slices_seen(tmp_path):
    def run(max_steps, recorder, ckpt_path=None, checkpoint=None):
        torch.manual_seed(0)
        monitor = lossplug.LossMonitor(slice_by="source", log_every_n_steps=2)
        callbacks = [monitor] + ([checkpoint] if checkpoint else [])
        trainer = quiet_trainer(
            tmp_path,
            recorder,
            callbacks,
            max_steps=max_steps,
            val_check_interval=2,
            enable_checkpointing=checkpoint is not None,
        )
        train = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(make_tokens(16, 10, seed=1)), batch_size=4
        )  # 4 batches: the checkpoint at step 4 ends an epoch, where a resume starts exactly
        val = torch.utils.data.DataLoader(sliced_batches(VAL_SOURCES), batch_size=None)
        trainer.fit(TinyLM(mode="sequence_stats"), train, val, ckpt_path=ckpt_path)
        return monitor

    whole = Recorder()
    run(8, whole)
    checkpoint = L.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1
    )
    first, second = Recorder(), Recorder()
    run(4, first, checkpoint=checkpoint)  # saved after step 4's batch: step 2's slices seen
    state = torch.load(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weights_only=False)
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("LossMonitor"))
    assert sorted(saved["slices_seen"]) == ["code", "math", "prose"]
    resumed = run(8, second, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    assert sorted(resumed.tracker.slices_seen) == ["code", "math", "prose"]
    steps = [step for step, _ in second.series("val/perplexity/code")]
    assert 6 in steps and 8 in steps
    for step in steps:
        want, got = logged_at(whole, step), logged_at(second, step)
        for name in ("code", "math", "prose"):
            key = f"val/perplexity/{name}"
            assert math.isclose(got[key], want[key], rel_tol=1e-9), (step, key, got, want)


# ------------------------------------------------------------------- the metric, no Lightning
def test_metric_slices_across_two_gloo_ranks_equal_a_float64_reference(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "rank0.pt"
    mp.spawn(ddp_run, args=(2, port, str(out)), nprocs=2, join=True)
    got = torch.load(out)["sliced"]
    batches = make_batches()
    seen = [(logits.double(), target) for logits, target in batches]
    want = reference_by_slice(seen, [batch_sources(i) for i in range(len(batches))])
    overall = got["tokens"]
    assert int(overall) == sum(values["tokens"] for values in want.values())
    for name, values in want.items():  # "a" only on rank 0, "c" only on rank 1
        for metric in (*NAMES, "tokens"):
            assert math.isclose(float(got[f"{metric}/{name}"]), values[metric], rel_tol=1e-6), (
                name,
                metric,
            )


def test_metric_slices_resume_from_state_dict_and_refuse_bad_labels():
    from lossplug.metrics import LanguageModelMetrics

    batches = make_batches(seed=3)
    whole = LanguageModelMetrics(shift=True, slices=("a", "b", "c"))
    for index, (logits, target) in enumerate(batches):
        whole.update(logits, target, slices=batch_sources(index))
    first = LanguageModelMetrics(shift=True, slices=("a", "b", "c"))
    for index, (logits, target) in enumerate(batches[:2]):
        first.update(logits, target, slices=batch_sources(index))
    resumed = LanguageModelMetrics(shift=True, slices=("a", "b", "c"))
    resumed.load_state_dict(first.state_dict())
    for index, (logits, target) in enumerate(batches[2:], start=2):
        # positions in slices, as a tensor: the same slices as the names
        positions = torch.tensor(["abc".index(s) for s in batch_sources(index)])
        resumed.update(logits, target, slices=positions)
    want, got = whole.compute(), resumed.compute()
    assert set(got) == set(want) and "perplexity/c" in got
    for key in want:
        assert torch.equal(got[key], want[key]), key
    logits, target = batches[0]
    with pytest.raises(ValueError, match=r"slice label 'd' is not one of slices=\('a', 'b', 'c'\)"):
        whole.update(logits, target, slices=["a", "d"])
    with pytest.raises(ValueError, match="positions outside"):
        whole.update(logits, target, slices=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="needs labels at every update"):
        whole.update(logits, target)
    with pytest.raises(ValueError, match="slices has 3 labels for 2 sequences"):
        whole.update(logits, target, slices=["a", "b", "c"])
    with pytest.raises(ValueError, match="per_sequence_stats=True"):
        _, stats = lossplug.cross_entropy(logits, target, return_stats=True)
        whole.update(stats, slices=["a"])
    for bad, error in ((("a", "a"), ValueError), (("a/b",), ValueError), ("ab", TypeError)):
        with pytest.raises(error, match="slice"):
            LanguageModelMetrics(slices=bad)


def test_per_sequence_stats_given_to_a_metric_without_slices_are_summed():
    from lossplug.metrics import LanguageModelMetrics, Perplexity

    logits, target = make_batches(seed=4)[0]
    _, per_sequence = lossplug.cross_entropy(
        logits, target, return_stats=True, per_sequence_stats=True
    )
    from_sequences, from_logits = Perplexity(), Perplexity()
    from_sequences.update(per_sequence)
    from_logits.update(logits, target)
    assert from_sequences.compute().shape == ()
    torch.testing.assert_close(from_sequences.compute(), from_logits.compute(), rtol=1e-12, atol=0)
    everything = LanguageModelMetrics()
    everything.update(per_sequence)
    assert int(everything.compute()["tokens"]) == int(per_sequence.tokens.sum())


class _PatchedCausalLM(L.LightningModule):
    """A patched Hugging Face model whose steps return the README's
    ``{"loss": out.loss, "stats": out.token_stats}``: the batch's 0-d stats."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def _step(self, batch):
        out = self.model(input_ids=batch["rows"][:, :10], labels=batch["rows"][:, 10:])
        return {"loss": out.loss, "stats": out.token_stats}

    def training_step(self, batch, batch_idx):
        return self._step(batch)

    def validation_step(self, batch, batch_idx):
        return self._step(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_patched_hugging_face_model_is_split_by_slice_from_the_same_pass(tmp_path):
    import transformers

    from lossplug.integrations.transformers import patch_causal_lm

    sizes = tiny_sizes(32, 48, heads=4, num_key_value_heads=2, max_position_embeddings=32)
    config = transformers.LlamaConfig(vocab_size=50, **sizes)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    batches = sliced_batches(VAL_SOURCES)
    with torch.no_grad():  # the reference: the unpatched model's own logits, in float64
        seen = [
            (model(input_ids=b["rows"][:, :10]).logits.double(), b["rows"][:, 10:]) for b in batches
        ]
    want = reference_by_slice(seen, [b["source"] for b in batches])
    patch_causal_lm(model)
    recorder = Recorder()
    trainer = quiet_trainer(
        tmp_path,
        recorder,
        [lossplug.LossMonitor(slice_by="source")],
        max_steps=1,
        val_check_interval=1,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(_PatchedCausalLM(model), loader, loader)
    row = logged_at(recorder, 1)
    for name, values in want.items():
        for metric in (*NAMES, "tokens"):
            got = row[f"val/{metric}/{name}"]
            assert math.isclose(got, values[metric], rel_tol=1e-5, abs_tol=1e-7), (name, metric)


def test_per_slice_keys_reach_a_real_wandb_run_with_their_summaries(tmp_path):
    from lossplug.loggers import read_run, wandb_logger

    torch.manual_seed(0)
    logger = wandb_logger("lossplug-slices", offline=True, save_dir=tmp_path, verbose=False)
    trainer = quiet_trainer(
        tmp_path,
        logger,
        [lossplug.LossMonitor(slice_by="source", log_every_n_steps=2)],
        max_steps=4,
        val_check_interval=2,
    )
    train = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(make_tokens(16, 10, seed=1)), batch_size=4
    )
    val = torch.utils.data.DataLoader(sliced_batches(VAL_SOURCES), batch_size=None)
    trainer.fit(TinyLM(mode="sequence_stats", lr=0.5), train, val)
    logger.experiment.finish()
    data = read_run(tmp_path, wait=20.0)
    assert data.complete, data.errors
    for name in ("code", "math", "prose"):
        series = data.series(f"val/perplexity/{name}")
        assert [step for step, _ in series] == [2, 4]
        assert data.metrics[f"val/perplexity/{name}"].summary == ("min",)
        assert data.summary[f"val/perplexity/{name}"] == {"min": min(v for _, v in series)}
        assert data.metrics[f"val/tokens/{name}"].summary == ("last",)
        assert data.metrics[f"val/token_accuracy/{name}"].summary == ("max",)
