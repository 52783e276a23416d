"""patch_causal_lm on tiny randomly initialised Hugging Face models: same loss, same gradients."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import pickle
import threading

import lightning.pytorch as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lossplug
from _reference import reference_cross_entropy
from _tiny_lm import CloseProcessGroup, tiny_sizes

transformers = pytest.importorskip("transformers")
from lossplug.integrations.transformers import (  # noqa: E402
    SUPPORTED_MODEL_TYPES,
    is_patched,
    patch_causal_lm,
    pop_token_stats,
    unpatch_causal_lm,
)

VOCAB = 97
DECODER = tiny_sizes(32, 48, 2, 4, num_key_value_heads=2, max_position_embeddings=64)
DECODER.update(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", DECODER),
    "mistral": ("MistralConfig", "MistralForCausalLM", DECODER),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", DECODER),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**DECODER, "head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**DECODER, "head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", DECODER),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
}


def build(model_type: str, seed: int = 0, **overrides):
    config_name, model_name, kwargs = CONFIGS[model_type]
    config = getattr(transformers, config_name)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config)


def batch(seed: int = 1, shape=(3, 13)):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, shape, generator=gen)
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt that is not scored
    labels[0, 9:] = -100  # and padding
    return ids, labels


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_every_supported_family_is_tested():
    # the others (a logit transform, MoE, a VLM) are tested in test_families.py
    assert set(CONFIGS) <= set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("num_items", [None, 23])
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_patched_model_has_the_unpatched_loss_and_gradients(model_type, num_items):
    reference = build(model_type)
    patched = patch_causal_lm(copy.deepcopy(reference))
    ids, labels = batch()
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}

    want = reference(input_ids=ids, labels=labels, **kw)
    want.loss.backward()
    got = patched(input_ids=ids, labels=labels, **kw)
    got.loss.backward()

    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert got.logits is None  # never built
    assert_same_grads(grads(patched), grads(reference))
    # the statistics of the same pass, against float64 on the unpatched model's logits
    _, ref_stats = reference_cross_entropy(want.logits.detach(), labels, shift=True)
    stats = got.token_stats
    assert int(stats.tokens) == int(ref_stats["tokens"])
    assert int(stats.correct) == int(ref_stats["correct"])
    torch.testing.assert_close(stats.nll_sum, ref_stats["nll_sum"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.entropy_sum, ref_stats["entropy_sum"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_gradient_accumulation_with_num_items_in_batch_is_exact(model_type):
    """Two micro-batches divided by the tokens of both equal the one full batch."""
    full = build(model_type)
    split = patch_causal_lm(copy.deepcopy(full))
    ids, labels = batch(shape=(4, 11))
    full(input_ids=ids, labels=labels).loss.backward()

    num_items = int((labels[:, 1:] != -100).sum())
    total = 0.0
    for rows in (slice(0, 1), slice(1, 4)):  # unequal token counts: a mean of means would differ
        out = split(input_ids=ids[rows], labels=labels[rows], num_items_in_batch=num_items)
        out.loss.backward()
        total += float(out.loss.detach())
    want = float(full(input_ids=ids, labels=labels).loss.detach())
    assert math.isclose(total, want, rel_tol=1e-5)
    assert_same_grads(grads(split), grads(full))


def test_shift_labels_keyword_is_honoured():
    reference = build("llama")
    patched = patch_causal_lm(copy.deepcopy(reference))
    ids, labels = batch()
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    want = reference(input_ids=ids, labels=labels, shift_labels=shifted).loss
    got = patched(input_ids=ids, labels=labels, shift_labels=shifted).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_calls_without_labels_are_untouched():
    reference = build("llama")
    patched = patch_causal_lm(copy.deepcopy(reference))
    ids, _ = batch()
    torch.testing.assert_close(patched(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert not hasattr(patched(input_ids=ids), "token_stats")
    prompt = ids[:1, :5]
    generated = patched.generate(prompt, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, reference.generate(prompt, max_new_tokens=3, do_sample=False))


def test_a_call_without_labels_from_another_thread_gets_logits_and_leaves_the_loss_alone():
    """A generation KPI that outlived its timeout, still running while the trainer evaluates."""
    reference = build("llama")
    model = patch_causal_lm(copy.deepcopy(reference))
    ids, labels = batch()
    other = batch(seed=7)[0]  # the same shape: its hidden states would fit the loss
    want_loss = reference(input_ids=ids, labels=labels).loss
    want_logits = reference(input_ids=other).logits
    got = {}

    def generate_in_another_thread(module, args, output):
        # the trainer's call has handed its hidden states on and its loss has not run yet
        if threading.current_thread() is threading.main_thread() and not got:
            generate = lambda: got.update(logits=model(input_ids=other).logits)  # noqa: E731
            thread = threading.Thread(target=generate)
            thread.start()
            thread.join()

    hook = model.get_output_embeddings().register_forward_hook(generate_in_another_thread)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, labels=labels)
    finally:
        hook.remove()
    torch.testing.assert_close(got["logits"], want_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, want_loss, rtol=1e-5, atol=1e-6)


def test_a_compiled_patched_model_gives_the_eager_loss_gradients_and_statistics():
    reference = build("llama")
    model = patch_causal_lm(copy.deepcopy(reference))
    ids, labels = batch()
    want = reference(input_ids=ids, labels=labels).loss
    want.backward()
    compiled = torch.compile(model)
    out = compiled(input_ids=ids, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    assert_same_grads(grads(model), grads(reference))
    assert int(pop_token_stats(model).tokens) == int((labels[:, 1:] != -100).sum())


def test_patch_is_idempotent_and_undone():
    model = build("qwen2")
    assert patch_causal_lm(model) is model and patch_causal_lm(model) is model
    assert is_patched(model)
    ids, labels = batch()
    assert model(input_ids=ids, labels=labels).logits is None
    unpatch_causal_lm(model)
    assert not is_patched(model)
    out = model(input_ids=ids, labels=labels)
    assert out.logits.shape == (*ids.shape, VOCAB)
    assert "_lossplug_patch" not in vars(model)
    assert unpatch_causal_lm(model) is model  # unpatching an unpatched model is a no-op


def test_stats_are_handed_out_once():
    model = patch_causal_lm(build("llama"))
    ids, labels = batch()
    model(input_ids=ids, labels=labels)
    container = nn.ModuleDict({"lm": model})
    first = pop_token_stats(container)
    assert int(first.tokens) == int((labels[:, 1:] != -100).sum())
    assert pop_token_stats(container) is None
    assert pop_token_stats(model) is None


def test_unsupported_family_gets_a_clear_error():
    config = transformers.Gemma2Config(**{**DECODER, "head_dim": 8})
    model = transformers.Gemma2ForCausalLM(config)
    model.loss_type = "ForMaskedLM"  # a loss the fused causal-LM loss does not replace
    with pytest.raises(ValueError, match=r"Gemma2ForCausalLM.*loss_type='ForMaskedLM'"):
        patch_causal_lm(model)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        patch_causal_lm("llama")


def test_wrapped_output_layer_gets_a_clear_error():
    class LoraLinear(nn.Linear):
        pass

    model = build("llama")
    old = model.lm_head
    model.lm_head = LoraLinear(old.in_features, old.out_features, bias=False)
    with pytest.raises(TypeError, match="LoraLinear"):
        patch_causal_lm(model)
    with pytest.raises(ValueError, match="backend"):
        patch_causal_lm(build("llama"), backend="cuda")


def test_options_reach_the_fused_loss():
    model = patch_causal_lm(build("llama"), z_loss=1e-3, label_smoothing=0.1)
    reference = build("llama")
    ids, labels = batch()
    got = model(input_ids=ids, labels=labels).loss
    logits = reference(input_ids=ids).logits
    want = lossplug.cross_entropy(logits, labels, shift=True, z_loss=1e-3, label_smoothing=0.1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_loss_monitor_logs_the_patched_models_stats(tmp_path):
    """A module that only returns ``out.loss``: LossMonitor still logs exact values."""
    import lightning.pytorch as L
    from torch.utils.data import DataLoader, TensorDataset

    from _tiny_lm import Recorder

    class HFModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = patch_causal_lm(build("llama"))
            self.seen = []

        def training_step(self, batch, batch_idx):
            ids, labels = batch
            with torch.no_grad():  # the unpatched logits, for the expected values
                self.seen.append((self.reference_logits(ids), labels.clone()))
            return self.model(input_ids=ids, labels=labels).loss

        def reference_logits(self, ids):
            hidden = self.model.model(input_ids=ids).last_hidden_state
            return self.model.lm_head(hidden).double()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    ids, labels = batch(shape=(8, 12))
    loader = DataLoader(TensorDataset(ids, labels), batch_size=2)
    module, recorder = HFModule(), Recorder()
    monitor = lossplug.LossMonitor(log_every_n_steps=2, stages=("train",))
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=recorder,
        callbacks=[monitor],
        max_steps=4,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, loader)
    logged = [value for _, value in recorder.series("train/perplexity")]
    assert len(logged) == 2
    for window, value in zip((module.seen[0:2], module.seen[2:4]), logged, strict=True):
        nll = sum(reference_cross_entropy(x, y, shift=True)[1]["nll_sum"] for x, y in window)
        tokens = sum(int((y[:, 1:] != -100).sum()) for _, y in window)
        assert math.isclose(value, math.exp(float(nll) / tokens), rel_tol=1e-5)


def test_bf16_model_and_gradient_checkpointing():
    """A bf16 model (its head rounds logits to bf16, as the torch path does) with checkpointing."""
    reference = build("llama").to(torch.bfloat16)
    patched = patch_causal_lm(copy.deepcopy(reference))
    for model in (reference, patched):
        model.gradient_checkpointing_enable()
        model.train()
    ids, labels = batch()
    want = reference(input_ids=ids, labels=labels)
    got = patched(input_ids=ids, labels=labels)
    want.loss.backward()
    got.loss.backward()
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(patched.named_parameters(), reference.parameters(), strict=True):
        assert p.grad.dtype == torch.bfloat16
        err = (p.grad.float() - q.grad.float()).norm() / q.grad.float().norm().clamp(min=1e-12)
        assert float(err) < 2e-2, name


class PatchedLlama(L.LightningModule):
    """A module holding a patched model, at module level so that ``ddp_spawn`` workers can
    unpickle it by name."""

    def __init__(self) -> None:
        super().__init__()
        self.model = patch_causal_lm(build("llama"))

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        return self.model(input_ids=ids, labels=labels).loss

    def configure_optimizers(self):
        # lr=0: the weights stay those of build("llama"), the reference's
        return torch.optim.SGD(self.parameters(), lr=0.0)


def assert_same_stats(got: lossplug.TokenStats, want: lossplug.TokenStats) -> None:
    for field in dataclasses.fields(want):
        assert torch.equal(getattr(got, field.name), getattr(want, field.name)), field.name


def reference_loss(model, ids, labels) -> torch.Tensor:
    """The float64 loss of ``model``'s own logits (its head called outside a call with labels)."""
    with torch.no_grad():
        logits = model.lm_head(model.model(input_ids=ids).last_hidden_state)
    loss, _ = reference_cross_entropy(logits.double(), labels, shift=True)
    return loss


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # gpt2: a head tied to the embeddings
def test_pickled_model_is_patched_and_computes_the_same(model_type):
    model = patch_causal_lm(build(model_type))
    ids, labels = batch()
    want = model(input_ids=ids, labels=labels)  # leaves its statistics on the model
    loaded = pickle.loads(pickle.dumps(model))

    assert is_patched(loaded)
    assert pop_token_stats(loaded) is None  # handed out by the model that computed them only
    assert pop_token_stats(model) is not None
    got = loaded(input_ids=ids, labels=labels)
    assert got.logits is None
    assert torch.equal(got.loss, want.loss)
    assert_same_stats(got.token_stats, want.token_stats)
    want.loss.backward()
    got.loss.backward()
    assert_same_grads(grads(loaded), grads(model))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # generate() and the transformers Trainer read the model's parameters from its forward
    assert inspect.signature(loaded.forward) == inspect.signature(build(model_type).forward)
    unpatch_causal_lm(loaded)
    assert loaded(input_ids=ids, labels=labels).logits.shape == (*ids.shape, VOCAB)
    assert is_patched(model)


def test_pickled_lightning_module_holds_a_patched_model():
    module = PatchedLlama()
    ids, labels = batch()
    want = module.model(input_ids=ids, labels=labels)
    loaded = pickle.loads(pickle.dumps(module))
    got = loaded.model(input_ids=ids, labels=labels)
    assert is_patched(loaded.model) and got.logits is None
    assert torch.equal(got.loss, want.loss)
    assert_same_stats(got.token_stats, want.token_stats)


def test_deep_copy_runs_its_own_weights_and_unpatches_alone():
    original = patch_causal_lm(build("llama"))
    clone = copy.deepcopy(original)
    ids, labels = batch()
    before = original(input_ids=ids, labels=labels).loss.detach()
    pop_token_stats(original)
    with torch.no_grad():
        clone.lm_head.weight.mul_(2.0)
        clone.model.layers[0].mlp.down_proj.weight.mul_(-1.0)
    want = reference_loss(clone, ids, labels)

    got = clone(input_ids=ids, labels=labels)
    assert is_patched(clone) and got.logits is None
    torch.testing.assert_close(got.loss.double(), want, rtol=1e-5, atol=1e-6)
    assert not math.isclose(float(got.loss.detach()), float(before), rel_tol=1e-3)
    assert pop_token_stats(original) is None  # the clone's statistics are the clone's
    assert int(pop_token_stats(clone).tokens) == int((labels[:, 1:] != -100).sum())
    assert torch.equal(original(input_ids=ids, labels=labels).loss, before)

    unpatch_causal_lm(clone)
    assert not is_patched(clone) and is_patched(original)
    out = clone(input_ids=ids, labels=labels)
    assert out.logits is not None
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)
    patched = original(input_ids=ids, labels=labels)
    assert patched.logits is None and torch.equal(patched.loss, before)
    unpatch_causal_lm(original)
    assert original(input_ids=ids, labels=labels).logits is not None


class DoubledLoss:
    """A forward someone set on the instance before the patch (as accelerate's wrappers are)."""

    def __init__(self, forward) -> None:
        self.__wrapped__ = forward  # what functools.wraps sets: the signature is forward's

    def __call__(self, *args, **kwargs):
        output = self.__wrapped__(*args, **kwargs)
        if output.loss is not None:
            output.loss = 2 * output.loss
        return output


def test_a_forward_set_before_the_patch_runs_inside_it_and_comes_back():
    model = build("llama")
    ids, labels = batch()
    want = 2 * model(input_ids=ids, labels=labels).loss
    wrapper = DoubledLoss(model.forward)
    model.forward = wrapper
    patch_causal_lm(model)
    got = model(input_ids=ids, labels=labels)
    assert got.logits is None
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-6)
    unpatch_causal_lm(model)
    assert vars(model)["forward"] is wrapper


def test_ddp_spawn_trains_a_patched_model(tmp_path):
    """ddp_spawn pickles the module to its workers; both ranks' statistics reach the log."""
    ids, labels = batch(shape=(8, 12))  # 2 ranks x 2 steps x 2 rows: every row once
    module = PatchedLlama()
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=2,
        logger=False,
        callbacks=[
            lossplug.LossMonitor(log_every_n_steps=2, stages=("train",)),
            CloseProcessGroup(),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(ids, labels), batch_size=2))

    logged = trainer.callback_metrics  # rank 0's, sent back to this process
    assert int(logged["train/tokens"]) == int((labels[:, 1:] != -100).sum())
    want = math.exp(float(reference_loss(build("llama"), ids, labels)))
    assert math.isclose(float(logged["train/perplexity"]), want, rel_tol=1e-5)
