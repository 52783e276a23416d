"""LossplugCallback(slice_by=...): evaluation values per slice of the data in a real Trainer."""

from __future__ import annotations

import copy
import functools
import inspect
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")
from lossplug.integrations.transformers import (  # noqa: E402
    LossplugCallback,
    patch_causal_lm,
)
from lossplug.monitoring.handoff import keep_inputs_for  # noqa: E402
from test_hf_trainer_callback import (  # noqa: E402
    make_trainer,
    reference_val,
    rows,
    rows_with,
    tiny_llama,
)

SOURCES = ["code", "prose", "code", "code", "prose", "docs", "code"]
#: the eval rows of the 2-process run (tests/_hf_ddp_job.py), in batches of 3 read in turn by
#: each rank: every slice is seen on one rank only
DDP_SOURCES = ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["c"] * 3


def with_sources(dataset, sources):
    return [{**row, "source": source} for row, source in zip(dataset, sources, strict=True)]


def keep_strings(features):
    """A collator that batches the tensors and keeps string values as lists."""
    batch = {}
    for key in features[0]:
        values = [feature[key] for feature in features]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def per_slice_reference(model, dataset, sources):
    names = sorted(set(sources))
    return {
        name: reference_val(
            model, [row for row, s in zip(dataset, sources, strict=True) if s == name]
        )
        for name in names
    }


def check_slices(row, reference, metrics=("perplexity", "cross_entropy", "token_accuracy")):
    tokens = 0.0
    for name, ref in reference.items():
        assert row[f"val/perplexity/{name}"] == pytest.approx(ref["perplexity"], rel=1e-5)
        assert row[f"val/cross_entropy/{name}"] == pytest.approx(ref["cross_entropy"], rel=1e-5)
        assert row[f"val/token_accuracy/{name}"] == pytest.approx(ref["token_accuracy"], abs=1e-9)
        assert row[f"val/tokens/{name}"] == ref["tokens"]
        tokens += row[f"val/tokens/{name}"]
    assert tokens == row["val/tokens"]  # the slices add up to the whole


def test_string_slices_from_a_batch_key_equal_a_float64_reference_per_slice(tmp_path):
    callback = LossplugCallback(slice_by="source")
    trainer = make_trainer(tmp_path, callback, collator=keep_strings)
    trainer.eval_dataset = with_sources(trainer.eval_dataset, SOURCES)
    trainer.train_dataset = with_sources(trainer.train_dataset, ["train"] * 40)
    trainer.train()
    val = rows_with(trainer.state.log_history, "val/perplexity")
    assert [row["step"] for row in val] == [3, 6]
    reference = per_slice_reference(trainer.model, trainer.eval_dataset, SOURCES)
    check_slices(val[-1], reference)
    # the whole is still the whole
    overall = reference_val(trainer.model, trainer.eval_dataset)
    assert val[-1]["val/perplexity"] == pytest.approx(overall["perplexity"], rel=1e-5)
    # training batches carry the key too, and are never split
    assert not [key for key in val[-1] if key.endswith("/train")]


def test_a_function_of_the_inputs_and_int_labels_through_the_default_collator(tmp_path):
    def first_token_parity(inputs):
        return inputs["input_ids"][:, 0] % 2

    trainer = make_trainer(tmp_path, LossplugCallback(slice_by=first_token_parity))
    metrics = trainer.evaluate()
    sources = [int(row["input_ids"][0]) % 2 for row in trainer.eval_dataset]
    check_slices(metrics, per_slice_reference(trainer.model, trainer.eval_dataset, sources))

    ints = make_trainer(tmp_path / "ints", LossplugCallback(slice_by="group"))
    ints.eval_dataset = [{**row, "group": i % 3} for i, row in enumerate(ints.eval_dataset)]
    got = ints.evaluate()
    groups = [i % 3 for i in range(len(ints.eval_dataset))]
    check_slices(got, per_slice_reference(ints.model, ints.eval_dataset, groups))


def test_a_key_the_collator_dropped_is_a_clear_error_at_the_first_evaluation(tmp_path):
    # transformers' default collator drops string values
    trainer = make_trainer(tmp_path, LossplugCallback(slice_by="source"))
    trainer.eval_dataset = with_sources(trainer.eval_dataset, SOURCES)
    with pytest.raises(KeyError, match=r"slice_by='source'.*no key 'source'.*collator"):
        trainer.evaluate()
    # nothing of the failed evaluation stays behind: the next one, with the labels, is exact
    trainer.data_collator = keep_strings
    check_slices(
        trainer.evaluate(), per_slice_reference(trainer.model, trainer.eval_dataset, SOURCES)
    )


def test_predict_on_data_without_the_slice_key_runs_and_changes_nothing(tmp_path):
    callback = LossplugCallback(slice_by="source")
    trainer = make_trainer(tmp_path, callback, collator=keep_strings, eval_strategy="no")
    trainer.eval_dataset = with_sources(trainer.eval_dataset, SOURCES)
    trainer.train_dataset = with_sources(trainer.train_dataset, ["train"] * 40)
    test_rows = rows(4, seed=5)  # labels, and no "source" column
    assert trainer.predict(test_rows).predictions is not None
    trainer.train()  # its logs are training logs, not the predict batches' evaluation
    train = rows_with(trainer.state.log_history, "train/perplexity")
    assert [row["step"] for row in train] == [2, 4, 6]
    assert not rows_with(trainer.state.log_history, "val/perplexity")
    trainer.predict(test_rows)
    reference = per_slice_reference(trainer.model, trainer.eval_dataset, SOURCES)
    check_slices(trainer.evaluate(), reference)


def test_added_after_the_trainer_evaluated_once_is_told_to_come_earlier(tmp_path):
    trainer = make_trainer(tmp_path, LossplugCallback(), eval_strategy="no")
    trainer.remove_callback(LossplugCallback)
    trainer.add_callback(LossplugCallback(slice_by=lambda inputs: [0] * len(inputs["labels"])))
    with pytest.raises(RuntimeError, match="Trainer\\(callbacks="):
        trainer.evaluate()


def test_the_key_reaches_the_column_filter_but_never_the_models_forward(tmp_path, monkeypatch):
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=61, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    )
    seen: list[set[str]] = []
    original = transformers.GPT2LMHeadModel.forward

    @functools.wraps(original)
    def spy(self, *args, **kwargs):
        seen.append(set(kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "forward", spy)
    patch_causal_lm(gpt2)
    assert "source" not in inspect.signature(gpt2.forward).parameters
    trainer = make_trainer(tmp_path, LossplugCallback(slice_by="source"), model=gpt2)
    trainer._set_signature_columns_if_needed()  # what remove_unused_columns keeps
    assert "source" in trainer._signature_columns
    ids = torch.randint(0, 61, (2, 7))
    out = gpt2(input_ids=ids, labels=ids, source=["a", "b"])
    assert out.token_stats.tokens == 12
    assert gpt2._lossplug_patch.pop_inputs()["source"] == ["a", "b"]
    # calls without labels (generation) lose the key too
    assert gpt2(input_ids=ids, source=["a", "b"]).logits.shape == (2, 7, 61)
    assert seen == [{"input_ids", "labels"}, {"input_ids"}]


def test_a_patched_model_with_a_lambda_slice_by_still_pickles_and_copies():
    model = patch_causal_lm(tiny_llama())
    keep_inputs_for([model], lambda inputs: [0] * len(inputs["labels"]))
    ids = torch.randint(0, 61, (2, 6))
    model(input_ids=ids, labels=ids)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        out = clone(input_ids=ids, labels=ids)
        assert out.token_stats.tokens == 10
        assert clone._lossplug_patch.pop_inputs() is None  # the callback's setting stays behind


def test_bad_slice_by_is_refused_with_its_value():
    with pytest.raises(TypeError, match=r"slice_by must be .*got 3"):
        LossplugCallback(slice_by=3)
    with pytest.raises(ValueError, match="slice_by must name a key"):
        LossplugCallback(slice_by="")
