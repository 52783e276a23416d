"""patch_causal_lm on models whose forward transforms the logits, MoE, a VLM and PEFT heads.

Each family is checked against the unpatched model: loss and every trainable gradient in fp32.
The reader of the forward (``_families``) is also checked on small hand-written forwards.
"""

from __future__ import annotations

import copy
import math
import types
import warnings

import pytest
import torch
from torch import nn

from _reference import reference_values
from _tiny_lm import (
    NAMESPACES,
    QUIET_TRAINING_ARGS,
    TINY_DECODER,
    logged_at,
    quiet_trainer,
    tiny_sizes,
)

transformers = pytest.importorskip("transformers")
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402

from lossplug.integrations._families import Fold, UnsupportedModelError, read_fold  # noqa: E402
from lossplug.integrations.transformers import (  # noqa: E402
    SUPPORTED_MODEL_TYPES,
    LossplugCallback,
    is_patched,
    patch_causal_lm,
    unpatch_causal_lm,
)

L, _, Recorder = NAMESPACES["lightning.pytorch"]
VOCAB, IMAGE_TOKEN, IMAGE_TOKENS = 64, 63, 4
TOL = dict(rtol=1e-5, atol=1e-5)
TEXT = dict(vocab_size=VOCAB, **TINY_DECODER)


def gemma2():  # soft-capping: final_logit_softcapping, small enough to bend random logits
    config = transformers.Gemma2Config(**TEXT, head_dim=8, final_logit_softcapping=0.5)
    return transformers.Gemma2ForCausalLM(config)


def cohere():  # a constant logit scale
    return transformers.CohereForCausalLM(transformers.CohereConfig(**TEXT, logit_scale=0.25))


def granite():  # a constant divisor
    return transformers.GraniteForCausalLM(transformers.GraniteConfig(**TEXT, logits_scaling=3.0))


def mixtral():  # a router loss added after the cross-entropy
    config = transformers.MixtralConfig(
        **TEXT, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True
    )
    return transformers.MixtralForCausalLM(config)


def llava():  # a VLM: image features merged into the text, then the language model's head
    # 8 x 8 pixels in 4 x 4 patches: 4 patches, IMAGE_TOKENS
    vision = transformers.CLIPVisionConfig(**tiny_sizes(image_size=8, patch_size=4))
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=transformers.LlamaConfig(**TEXT),
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-1,
    )
    return transformers.LlavaForConditionalGeneration(config)


def bert():  # the output layer inside a module (dense, activation, norm, then the decoder)
    sizes = tiny_sizes(max_position_embeddings=32, is_decoder=True)
    config = transformers.BertConfig(vocab_size=VOCAB, **sizes)
    return transformers.BertLMHeadModel(config)


FAMILIES = {
    "bert": bert,
    "gemma2": gemma2,
    "cohere": cohere,
    "granite": granite,
    "mixtral": mixtral,
    "llava": llava,
}


def build(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return FAMILIES[family]().train()


def batch(family: str, seed: int = 1, rows: int = 3, seq: int = 12) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, IMAGE_TOKEN, (rows, seq), generator=gen)
    labels = ids.clone()
    labels[:, :2] = -100
    labels[0, 9:] = -100
    inputs = {"input_ids": ids, "labels": labels}
    if family == "llava":  # an image before the text: its tokens are never scored
        ids[:, :IMAGE_TOKENS] = IMAGE_TOKEN
        labels[:, :IMAGE_TOKENS] = -100
        inputs["pixel_values"] = torch.randn(rows, 3, 8, 8, generator=gen)
    return inputs


def loss_and_grads(model, inputs, **kwargs):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # dropout and routing draw the same in both models
    out = model(**inputs, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same(got, want) -> None:
    (got_out, got_grads), (want_out, want_grads) = got, want
    torch.testing.assert_close(got_out.loss, want_out.loss, **TOL)
    assert got_grads.keys() == want_grads.keys() and want_grads
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, **TOL, msg=name)


def test_every_family_named_supported_is_tested():
    from test_transformers_integration import CONFIGS

    assert sorted({*CONFIGS, *FAMILIES}) == sorted(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("num_items", [None, 19])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_is_exact_in_loss_and_every_gradient(family, num_items):
    reference = build(family)
    patched = patch_causal_lm(copy.deepcopy(reference), backend="torch")
    inputs = batch(family)
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    got = loss_and_grads(patched, inputs, **extra)
    assert_same(got, loss_and_grads(reference, inputs, **extra))
    out = got[0]
    assert out.logits is None and "logits" not in out
    assert int(out.token_stats.tokens) == int((inputs["labels"][:, 1:] != -100).sum())
    if family == "mixtral":  # the router's loss is in the loss, as unpatched
        assert out.aux_loss is not None and out.aux_loss > 0
    # calls without labels are the model's own
    with torch.no_grad():
        plain = {k: v for k, v in inputs.items() if k != "labels"}
        logits = [torch.manual_seed(5) and m(**plain).logits for m in (patched, reference)]
        torch.testing.assert_close(*logits)


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite", "mixtral"])
def test_each_transform_is_exact_on_the_triton_backend(family):
    """Soft-capping, a logit scale, a divisor and a router loss through the Triton kernels."""
    reference = build(family)
    patched = patch_causal_lm(copy.deepcopy(reference), backend="triton")
    inputs = batch(family, rows=2, seq=6)
    assert_same(loss_and_grads(patched, inputs), loss_and_grads(reference, inputs))


def test_a_tuple_output_has_no_logits_stand_in():
    patched = patch_causal_lm(build("cohere"))
    out = patched(**batch("cohere"), return_dict=False)
    assert isinstance(out, tuple) and out[0].dim() == 0
    assert all(not (isinstance(x, torch.Tensor) and x.numel() == 0) for x in out)


# ------------------------------------------------------------------------------------------ PEFT
def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT))


def peft_llama(**lora):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora)
    torch.manual_seed(3)
    return peft.get_peft_model(tiny_llama(), config).train()


@pytest.mark.parametrize(
    "lora",
    [
        dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
        dict(target_modules=["q_proj", "lm_head"], lora_dropout=0.2),
    ],
    ids=["modules_to_save", "lora_on_lm_head"],
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_peft_output_layer_is_exact_in_every_trainable_gradient(lora, backend):
    reference = peft_llama(**lora)
    patched = copy.deepcopy(reference)
    assert patch_causal_lm(patched, backend=backend) is patched.get_base_model()
    assert is_patched(patched.base_model)
    inputs = batch("llama")
    got, want = loss_and_grads(patched, inputs), loss_and_grads(reference, inputs)
    assert_same(got, want)
    head = [n for n in want[1] if "lm_head" in n]
    assert head and all("modules_to_save" in n or "lora_" in n for n in head)
    # adapters off: the original output layer (frozen, so the loss alone)
    with patched.disable_adapter(), reference.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(patched(**inputs).loss, reference(**inputs).loss, **TOL)


def test_dora_on_the_output_layer_is_refused_with_its_reason():
    model = peft_llama(target_modules=["lm_head"], use_dora=True)
    with pytest.raises(TypeError, match=r"LlamaForCausalLM.*DoRA.*fallback.*LossMonitor"):
        patch_causal_lm(model)


# ------------------------------------------------------------------------------ the reader
class _Forward(nn.Module):
    """A model with an output layer and a config; each subclass's forward is a case."""

    def __init__(self, **config) -> None:
        super().__init__()
        self.lm_head = nn.Linear(4, 8)
        self.config = types.SimpleNamespace(**config)


class ScaledThenCapped(_Forward):
    def forward(self, hidden_states, labels=None):
        logits = self.lm_head(hidden_states) * self.config.mult
        if (cap := self.config.cap) is not None:
            logits = logits / cap
            logits = torch.tanh(logits)
            logits = logits * cap
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            loss = self.loss_function(logits=logits, labels=labels)
        return loss


class CappedInOneLine(_Forward):
    def forward(self, hidden_states, labels=None):
        logits = self.lm_head(hidden_states).float()
        cap = getattr(self.config, "cap", None)
        logits = nn.functional.tanh(logits / cap) * cap
        return self.loss_function(logits, labels)


class Softcap(nn.Module):
    def __init__(self, cap: float) -> None:
        super().__init__()
        self.cap = cap

    def forward(self, x):
        return torch.tanh(x / self.cap) * self.cap


class CappedByAModule(_Forward):
    def __init__(self, **config) -> None:
        super().__init__(**config)
        self.logit_softcap = Softcap(config["cap"])

    def forward(self, hidden_states, labels=None):
        logits = self.lm_head(hidden_states).float()
        logits = self.logit_softcap(logits)
        return self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1])


class TrainingOnly(_Forward):
    def forward(self, hidden_states, labels=None):
        logits = self.lm_head(hidden_states)
        if self.training:
            logits = logits * 2
        return self.loss_function(logits, labels)


class LossInAHelper(_Forward):
    def forward(self, hidden_states, labels=None):
        logits = self.lm_head(hidden_states)
        return self.compute_loss(logits, labels)


class HeadTwice(_Forward):
    def forward(self, hidden_states, labels=None):
        logits = self.lm_head(hidden_states)
        draft = self.lm_head(hidden_states + 1)  # a second prediction (multi-token)
        return self.loss_function(logits, labels) + self.loss_function(draft, labels)


@pytest.mark.parametrize(
    "model, fold",
    [
        (ScaledThenCapped(mult=3.0, cap=0.5), Fold(scale=3.0, softcap=0.5, touched=True)),
        (ScaledThenCapped(mult=3.0, cap=None), Fold(scale=3.0, touched=True)),
        (CappedInOneLine(cap=7.0), Fold(scale=1.0, softcap=7.0, touched=True)),
        (CappedByAModule(cap=5.0), Fold(scale=1.0, softcap=5.0, touched=True)),
    ],
)
def test_reader_folds_what_the_forward_does(model, fold):
    assert read_fold(model, model.lm_head) == fold


@pytest.mark.parametrize(
    "model, match",
    [
        (TrainingOnly(), r"TrainingOnly.*changes the logits.*`if self.training:`"),
        (LossInAHelper(), r"LossInAHelper.*does not pass the logits to self.loss_function"),
        (CappedInOneLine(cap=0), r"a factor of the logits is 0"),
        (HeadTwice(), r"HeadTwice.*calls the output layer more than once"),
    ],
)
def test_reader_refuses_what_it_cannot_reproduce_and_says_why(model, match):
    with pytest.raises(UnsupportedModelError, match=match):
        read_fold(model, model.lm_head)


class WritesIntoTheLogits(transformers.LlamaForCausalLM):
    def forward(self, input_ids=None, labels=None, **kwargs):
        hidden_states = self.model(input_ids=input_ids).last_hidden_state
        logits = self.lm_head(hidden_states)
        logits[..., 0] = -1e4  # a token the model may never predict
        loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def test_a_model_that_writes_into_its_logits_is_refused_with_class_line_and_fallback():
    model = WritesIntoTheLogits(transformers.LlamaConfig(**TEXT))
    with pytest.raises(UnsupportedModelError) as error:
        patch_causal_lm(model)
    message = str(error.value)
    assert "WritesIntoTheLogits" in message and "`logits[..., 0] = -1e4" in message
    assert "LossMonitor" in message and not is_patched(model)


class HandsLabelsOn(nn.Module):
    """A wrapper whose forward hands its labels to the causal LM inside it (as Kosmos 2.5)."""

    def __init__(self, text_model) -> None:
        super().__init__()
        self.text_model = text_model

    def get_output_embeddings(self):
        return self.text_model.get_output_embeddings()

    def forward(self, input_ids=None, labels=None):
        outputs = self.text_model(input_ids=input_ids, labels=labels)
        return outputs


def test_a_wrapper_that_hands_its_labels_on_gets_the_model_inside_patched():
    reference = HandsLabelsOn(tiny_llama())
    patched = copy.deepcopy(reference)
    assert patch_causal_lm(patched) is patched and is_patched(patched)
    assert is_patched(patched.text_model)
    inputs = batch("llama")
    assert_same(loss_and_grads(patched, inputs), loss_and_grads(reference, inputs))
    unpatch_causal_lm(patched)
    assert not is_patched(patched) and patched(**inputs).logits is not None


# ------------------------------------------------------------------ short real training runs
#: the values checked against a short real run
CHECKED = ("cross_entropy", "perplexity", "token_accuracy", "tokens")


def model_values(model, batches) -> dict[str, float]:
    """Float64 token-weighted values of the unpatched computation over ``batches``."""
    with torch.no_grad():
        scored = [
            (model(**{k: v for k, v in inputs.items() if k != "labels"}).logits, inputs["labels"])
            for inputs in batches
        ]
    values = reference_values(scored, shift=True)
    return {name: values[name] for name in CHECKED}


def dataset(family: str, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    inputs = batch(family, seed=seed, rows=n)
    return [{key: value[i] for key, value in inputs.items()} for i in range(n)]


@pytest.mark.parametrize("family", ["mixtral", "llava"])
def test_hf_trainer_callback_logs_exact_values_for_moe_and_vlm(family, tmp_path):
    model = patch_causal_lm(build(family))
    args = transformers.TrainingArguments(
        **QUIET_TRAINING_ARGS, output_dir=str(tmp_path), max_steps=4, eval_steps=4
    )
    val = dataset(family, 5, seed=2)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=dataset(family, 8, seed=1),
        eval_dataset=val,
        callbacks=[LossplugCallback()],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    logged = [row for row in trainer.state.log_history if "val/perplexity" in row][-1]
    train = [row for row in trainer.state.log_history if "train/tokens" in row]
    assert [row["step"] for row in train] == [2, 4] and train[-1]["train/tokens"] > 0
    batches = [
        {key: torch.stack([row[key] for row in val[i : i + 3]]) for key in val[0]}
        for i in range(0, len(val), 3)
    ]
    want = model_values(trainer.model, batches)  # the weights of the evaluation
    for name in CHECKED:
        assert logged[f"val/{name}"] == pytest.approx(want[name], rel=1e-5), name


class _HFModule(L.LightningModule):
    """A patched Hugging Face model trained by Lightning: the step returns the model's loss."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def training_step(self, inputs, batch_idx):
        return self.model(**inputs).loss

    def validation_step(self, inputs, batch_idx):
        return self.model(**inputs).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # the reference's weights stay


@pytest.mark.parametrize("family", ["mixtral", "llava"])
def test_loss_monitor_logs_exact_values_for_moe_and_vlm(family, tmp_path):
    import lossplug

    model = build(family)
    train = [batch(family, seed=s, rows=2) for s in (1, 2)]
    val = [batch(family, seed=s) for s in (3, 4)]
    # the train window of step 2 is its batch; its token count is over the whole run
    want = {"train": model_values(model, train[1:]), "val": model_values(model, val)}
    want["train"]["tokens"] = model_values(model, train)["tokens"]
    recorder = Recorder()
    trainer = quiet_trainer(
        tmp_path,
        recorder,
        [lossplug.LossMonitor(log_every_n_steps=1)],
        max_steps=2,
        val_check_interval=2,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaders = [torch.utils.data.DataLoader(b, batch_size=None) for b in (train, val)]
        trainer.fit(_HFModule(patch_causal_lm(model)), *loaders)
    row = logged_at(recorder, 2)
    for stage, values in want.items():
        for name, value in values.items():
            got = row[f"{stage}/{name}"]
            assert math.isclose(got, value, rel_tol=1e-5, abs_tol=1e-7), (stage, name)
