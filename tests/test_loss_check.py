"""LossMonitor compares the loss a step trained on with its own cross-entropy, and warns once."""

from __future__ import annotations

import functools
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import lossplug
from _reference import reference_cross_entropy
from _tiny_lm import NAMESPACES, VOCAB, quiet_trainer
from lossplug.monitoring.loss_check import LossCheck, other_shift_nll
from lossplug.ops.stats import TokenStats

SEQ = 12


def successor_rows(n_rows: int, *, seed: int, ignore_share: float = 0.2) -> torch.Tensor:
    """Rows of ``[tokens | labels]`` where the next token is mostly ``7 * token + 3 (mod V)``:
    a bigram model learns it, so scoring the wrong position is visibly worse. Labels equal the
    tokens (Hugging Face style) with some positions ignored."""
    gen = torch.Generator().manual_seed(seed)
    columns = [torch.randint(0, VOCAB, (n_rows, 1), generator=gen)]
    for _ in range(SEQ - 1):
        noise = torch.rand(n_rows, 1, generator=gen) < 0.1
        random = torch.randint(0, VOCAB, (n_rows, 1), generator=gen)
        columns.append(torch.where(noise, random, (columns[-1] * 7 + 3) % VOCAB))
    tokens = torch.cat(columns, dim=1)
    labels = tokens.clone()
    labels[torch.rand(n_rows, SEQ, generator=gen) < ignore_share] = -100
    return torch.cat([tokens, labels], dim=1)


def loader(n_batches: int, batch_size: int = 4, *, seed: int = 2, **kw) -> DataLoader:
    rows = successor_rows(n_batches * batch_size, seed=seed, **kw)
    return DataLoader(TensorDataset(rows), batch_size=batch_size, shuffle=False)


def hf_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean", **kw
) -> torch.Tensor:
    """What a Hugging Face causal LM does with ``labels``: shift inside, mean over the scored
    tokens (0, not nan, for a batch with none, so that such a batch does not wreck training)."""
    vocab = logits.shape[-1]
    scored = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), scored, reduction="sum", **kw)
    return total if reduction == "sum" else total / max(int((scored != -100).sum()), 1)


class _StepReturnsLogits:
    """A bigram LM (pretrained) whose step returns ``{"loss", "logits", "labels"}``.

    ``labels``: ``"hf"`` returns the labels as given (equal to the inputs; the loss shifts them),
    ``"shifted"`` returns them already shifted (``labels[t]`` is the token after ``t``).
    ``loss``: ``"mean"`` (the Hugging Face loss), ``"sum"``, ``"smooth"`` (label smoothing 0.1).
    ``offset_from``: from this optimizer step on, the loss returned is 1 nat too high.
    ``prefix``: put before the keys ``logits`` and ``labels`` (for ``LossMonitor(extract=…)``).
    """

    def __init__(self, labels="hf", loss="mean", offset_from=None, prefix=""):
        super().__init__()
        self.labels_kind, self.loss_kind, self.offset_from = labels, loss, offset_from
        self.prefix = prefix
        self.load_state_dict(pretrained_weights())
        self.batches: list[tuple] = []  # (logits, labels, loss) of each training micro-batch

    def _step(self, batch, stage):
        (rows,) = batch
        tokens, labels = rows[:, :SEQ], rows[:, SEQ:]
        logits = self(tokens)
        options = {"mean": {}, "sum": {"reduction": "sum"}, "smooth": {"label_smoothing": 0.1}}
        loss = hf_loss(logits, labels, **options[self.loss_kind])
        if self.offset_from is not None and self.global_step >= self.offset_from:
            loss = loss + 1.0
        if stage == "train":
            self.batches.append((logits.detach().double(), labels, loss.detach().double()))
        if self.labels_kind == "shifted":
            labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        return {"loss": loss, f"{self.prefix}logits": logits, f"{self.prefix}labels": labels}


class LogitsLM(_StepReturnsLogits, NAMESPACES["lightning.pytorch"][1]):
    pass


class LogitsLMPL(_StepReturnsLogits, NAMESPACES["pytorch_lightning"][1]):
    pass


MODULES = {"lightning.pytorch": LogitsLM, "pytorch_lightning": LogitsLMPL}


@functools.cache
def pretrained_weights() -> dict[str, torch.Tensor]:
    """Weights that predict the successor rule: fine-tuning starts from a model that knows
    something, as in the issue (a wrong shift is invisible on a random model)."""
    torch.manual_seed(0)
    model = NAMESPACES["lightning.pytorch"][1]()  # the plain bigram LM: same parameters
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    rows = successor_rows(256, seed=1)
    for _ in range(100):
        loss = hf_loss(model(rows[:, :SEQ]), rows[:, SEQ:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fit(lightning, module, monitor, tmp_path, *, train=None, val=None, **kw) -> list[str]:
    """Fit on CPU and return the LossMonitor warnings raised."""
    settings = dict(max_steps=6, limit_val_batches=0 if val is None else None)
    settings.update(kw)
    trainer = quiet_trainer(tmp_path, False, [monitor], lightning=lightning, **settings)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, train if train is not None else loader(6), val)
    return [str(w.message) for w in caught if str(w.message).startswith("LossMonitor:")]


def numbers(message: str) -> tuple[float, float]:
    """The trained loss and the monitor's cross-entropy the warning quotes."""
    got = re.search(r"returned \(([\d.]+), .*? got \(([\d.]+),", message)
    assert got, message
    return float(got.group(1)), float(got.group(2))


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_unshifted_labels_without_shift_warn_once_and_say_shift_true(namespace, tmp_path):
    lightning = NAMESPACES[namespace][0]
    module = MODULES[lightning.__name__](labels="hf")
    monitor = lossplug.LossMonitor(log_every_n_steps=1)  # default shift=False: the bug
    found = fit(lightning, module, monitor, tmp_path)
    assert len(found) == 1, found  # once, though every window disagrees
    (message,) = found
    assert "pass LossMonitor(shift=True)" in message and "training_step" in message
    # the two values, in float64: the first window is the first micro-batch
    loss, ce = numbers(message)
    logits, labels, trained = module.batches[0]
    assert loss == pytest.approx(trained.item(), abs=1e-4)
    # the step's loss is what a Hugging Face causal LM computes from these labels
    from transformers.loss.loss_utils import ForCausalLMLoss

    hf = ForCausalLMLoss(logits, labels, vocab_size=VOCAB)
    assert trained.item() == pytest.approx(hf.item(), rel=1e-6)
    want, _ = reference_cross_entropy(logits, labels)  # what shift=False scores
    assert ce == pytest.approx(want.item(), abs=1e-4)
    assert ce > 2 * loss  # a real disagreement, not rounding


@pytest.mark.parametrize("form", ["logits", "extract"])
def test_already_shifted_labels_with_shift_true_say_shift_false(form, tmp_path):
    lightning = NAMESPACES["lightning.pytorch"][0]
    if form == "extract":
        module = MODULES[lightning.__name__](labels="shifted", prefix="my_")

        def extract(outputs, batch):
            return outputs["my_logits"], outputs["my_labels"]
    else:
        module, extract = MODULES[lightning.__name__](labels="shifted"), None
    monitor = lossplug.LossMonitor(log_every_n_steps=2, shift=True, extract=extract)
    found = fit(lightning, module, monitor, tmp_path)
    assert len(found) == 1 and "pass LossMonitor(shift=False)" in found[0], found


@pytest.mark.parametrize(
    ("case", "module_kw", "monitor_kw", "trainer_kw"),
    [
        ("hf labels, shift=True", {}, dict(shift=True), {}),
        ("gradient accumulation 2", {}, dict(shift=True), dict(accumulate_grad_batches=2)),
        ("labels shifted by the user", dict(labels="shifted"), {}, {}),
        ("bf16 weights, logits and loss", {}, dict(shift=True), dict(precision="bf16-true")),
        ("a sum of the same losses", dict(loss="sum"), dict(shift=True), {}),
    ],
)
def test_correct_setups_never_warn(case, module_kw, monitor_kw, trainer_kw, tmp_path):
    lightning = NAMESPACES["lightning.pytorch"][0]
    # ignored tokens everywhere, and one batch of only ignored tokens
    rows = successor_rows(24, seed=3, ignore_share=0.3)
    rows[8:12, SEQ:] = -100
    train = DataLoader(TensorDataset(rows), batch_size=4)
    monitor = lossplug.LossMonitor(log_every_n_steps=1, **monitor_kw)
    found = fit(
        lightning,
        MODULES[lightning.__name__](**module_kw),
        monitor,
        tmp_path,
        train=train,
        val=loader(2, seed=4),
        val_check_interval=3,
        **trainer_kw,
    )
    assert found == [], (case, found)
    # the check did run: the first train windows and the first validation were compared
    assert monitor.tracker._windows_to_check == {"train": 0, "val": 0}, case


def test_validation_alone_is_checked(tmp_path):
    lightning = NAMESPACES["lightning.pytorch"][0]
    monitor = lossplug.LossMonitor(stages=("val",))
    found = fit(
        lightning,
        MODULES[lightning.__name__](),
        monitor,
        tmp_path,
        val=loader(2, seed=4),
        max_steps=2,
        val_check_interval=2,
    )
    assert len(found) == 1 and "validation_step" in found[0] and "val/perplexity" in found[0]


def test_intended_differences_list_the_causes_and_check_loss_false_is_quiet(tmp_path):
    lightning = NAMESPACES["lightning.pytorch"][0]
    module = MODULES[lightning.__name__](loss="smooth")
    found = fit(lightning, module, lossplug.LossMonitor(log_every_n_steps=2, shift=True), tmp_path)
    assert len(found) == 1, found
    for cause in ("`shift` (now True", "`ignore_index` (now -100", "label_smoothing", "z_loss"):
        assert cause in found[0], cause
    assert "check_loss=False" in found[0]
    quiet = lossplug.LossMonitor(log_every_n_steps=2, shift=True, check_loss=False)
    assert fit(lightning, MODULES[lightning.__name__](loss="smooth"), quiet, tmp_path) == []


@pytest.mark.parametrize(("offset_from", "warned"), [(1, True), (3, False)])
def test_only_the_first_three_windows_are_checked(offset_from, warned, tmp_path):
    lightning = NAMESPACES["lightning.pytorch"][0]
    module = MODULES[lightning.__name__](offset_from=offset_from)
    monitor = lossplug.LossMonitor(log_every_n_steps=1, shift=True)
    found = fit(lightning, module, monitor, tmp_path)
    assert len(found) == int(warned), found


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_other_shift_from_the_per_token_nll_equals_float64(shift, softcap):
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 9, 11)).to(torch.bfloat16)
    labels = torch.randint(0, 11, (3, 9))
    labels[0, 2] = labels[1, 5] = labels[2, 8] = -100
    nll = lossplug.cross_entropy(logits, labels, reduction="none", shift=shift, softcap=softcap)
    total, tokens = other_shift_nll(
        logits, labels, nll, shift=shift, ignore_index=-100, softcap=softcap
    )
    both = (labels[:, :-1] != -100) & (labels[:, 1:] != -100)
    other = torch.where(both, labels[:, :-1] if shift else labels[:, 1:], -100)
    want, stats = reference_cross_entropy(logits[:, :-1], other, softcap=softcap, reduction="sum")
    assert int(tokens) == int(stats["tokens"]) == 3 * 8 - 5
    assert total.item() == pytest.approx(want.item(), rel=1e-6)


def test_adding_to_the_check_needs_no_host_sync():
    """On the meta device any read of a value (``.item()``, ``bool()``) raises."""
    meta = torch.device("meta")
    logits = torch.empty(2, 5, 7, device=meta)
    labels = torch.empty(2, 5, dtype=torch.int64, device=meta)
    nll = torch.empty(2, 5, device=meta)
    other = other_shift_nll(logits, labels, nll, shift=False, ignore_index=-100, softcap=2.0)
    stats = TokenStats.zeros(meta)
    check = LossCheck()
    check.add(torch.empty((), device=meta), stats, other)
    check.add(torch.empty((), device=meta), stats)
    assert check.sums is not None and check.sums.shape == (7,)
