"""Which causal-LM families of the installed ``transformers`` ``patch_causal_lm`` computes exactly.

For every family of the causal-LM auto mapping (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``) and every
vision-language ``...ForConditionalGeneration`` class of the image-text-to-text mapping, in a
process of its own (a crash or a hang costs one row), with a time limit:

1. build a tiny random fp32 model from the family's default config, shrunk (hidden sizes, layers,
   heads, vocabulary, experts; dropout off, router losses on); "builds tiny" means the model is
   built and the unpatched model computes a loss from ``input_ids`` and ``labels`` alone (a VLM
   runs text-only: its language head is what is patched);
2. patch a deep copy with ``patch_causal_lm`` and compare its loss and the gradient of every
   parameter with the unpatched model's (same seed before each call): ``exact`` when all are
   within ``|a - b| <= 1e-5 + 1e-5 |b|``; beyond it, ``rounding`` when the patched values are no
   farther from the model's fp64 computation than the unpatched fp32 values are (at most 2x),
   ``differs`` otherwise; ``refused`` when ``patch_causal_lm`` refuses the model (the row keeps
   its reason), ``error`` when the patched call raises.

Usage::

    nice -n 10 python benchmarks/families.py                 # all families (~15 min on 2 cores)
    python benchmarks/families.py --only llama,gemma2,cohere  # some model types
    python benchmarks/families.py --jobs 2 --timeout 180 --json families.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import sys
import time
from typing import Any

TOL = 1e-5
VOCAB = 256
# the attributes shrunk in a config and its sub-configs (text, vision, audio …), when present and
# larger; the second set is tried when a family does not build with the first
TINY = {
    "hidden_size": 32,
    "n_embd": 32,
    "d_model": 32,
    "embed_dim": 32,
    "intermediate_size": 64,
    "ffn_dim": 64,
    "n_inner": 64,
    "d_ff": 64,
    "moe_intermediate_size": 32,
    "expert_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_hidden_layers": 2,
    "n_layer": 2,
    "n_layers": 2,
    "num_layers": 2,
    "depth": 1,
    "num_attention_heads": 2,
    "n_head": 2,
    "n_heads": 2,
    "num_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "num_local_experts": 4,
    "num_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "top_k": 2,
    "n_shared_experts": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 16,
    "rotary_dim": 8,
    "v_head_dim": 16,
    "vocab_size": VOCAB,
}
WIDER = {**TINY, "hidden_size": 64, "n_embd": 64, "d_model": 64, "embed_dim": 64,
         "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 128}  # fmt: skip
# the logit transforms patch_causal_lm folds, set where a config has them (their defaults may be
# 1.0 or None, which would leave them untested)
TRANSFORMS = {"logits_scaling": 8.0, "logit_scale": 0.25, "final_logit_softcapping": 30.0}
# special tokens beyond the shrunk vocabulary, moved inside it
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 0}


def families() -> list[tuple[str, str]]:
    """``(model_type, class name)`` of every causal LM and image-text-to-text model, once."""
    from transformers.models.auto import modeling_auto as auto

    found: dict[str, tuple[str, str, bool]] = {}  # by class name: one row per class
    mappings = (
        auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )
    for mapping in mappings:
        for model_type, names in mapping.items():
            name = names[0] if isinstance(names, list | tuple) else names
            # several model types may share a class: name the row after the one it is named for
            plain = name.lower().replace("_", "")
            named = plain.startswith(model_type.replace("_", "").replace("-", ""))
            if name not in found or (named and not found[name][2]):
                found[name] = (model_type, name, named)
    return sorted((model_type, name) for model_type, name, _ in found.values())


# ----------------------------------------------------------------------------------------------
# one family, in its own process


def _shrink(config: Any, sizes: dict[str, int], seen: set[int]) -> None:
    from transformers import PretrainedConfig

    if id(config) in seen:
        return
    seen.add(id(config))
    for name, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            _shrink(value, sizes, seen)
        elif name in sizes and isinstance(value, int) and not isinstance(value, bool):
            if value > sizes[name]:
                setattr(config, name, sizes[name])
        elif ("dropout" in name or name.endswith("_pdrop")) and isinstance(value, float):
            setattr(config, name, 0.0)
    _fewer_layers(config)
    _fit_mrope(config)
    for name, value in TRANSFORMS.items():
        if hasattr(config, name):  # a non-trivial value, so that the transform is exercised
            with contextlib.suppress(AttributeError):  # a read-only property
                setattr(config, name, value)
    if hasattr(config, "output_router_logits"):
        config.output_router_logits = True  # the router's loss is added: it must stay exact
    vocab = getattr(config, "vocab_size", None)
    for name in TOKEN_IDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and isinstance(vocab, int) and value >= vocab:
            setattr(config, name, TOKEN_IDS[name])


def _fewer_layers(config: Any) -> None:
    """Per-layer lists cut to the (shrunk) layer count, keeping one layer of each kind (a hybrid
    needs an attention layer beside its recurrent ones)."""
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int):
        return
    for name in ("layer_types", "layers_block_type", "mlp_only_layers"):
        value = getattr(config, name, None)
        if not isinstance(value, list) or len(value) <= layers:
            continue
        if name == "mlp_only_layers":
            setattr(config, name, [i for i in value if i < layers])
            continue
        kinds = list(dict.fromkeys(value))
        kept = (kinds + value)[: max(layers, len(kinds))]
        with contextlib.suppress(Exception):
            config.num_hidden_layers = layers = len(kept)
            setattr(config, name, kept)


def _fit_mrope(config: Any) -> None:
    """Multimodal rotary sections must sum to half the (shrunk) head size."""
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and isinstance(heads, int) and isinstance(config.hidden_size, int):
        head_dim = config.hidden_size // heads
    for name in ("rope_parameters", "rope_scaling"):
        rope = getattr(config, name, None)
        if isinstance(rope, dict) and "vl" in str(getattr(config, "model_type", "")):
            rope.setdefault("mrope_section", [16, 24, 24])  # the Qwen-VL default, rescaled below
        if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list) and head_dim:
            half, parts = head_dim // 2, len(rope["mrope_section"])
            sections = [half // parts] * parts
            sections[-1] += half - sum(sections)
            rope["mrope_section"] = sections


def _build(model_type: str, class_name: str, sizes: dict[str, int]):
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(model_type)
    _shrink(config, sizes, set())
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(config).float()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.train()


def _batch(model):
    import torch

    vocab = model.get_output_embeddings().out_features if hasattr(model, "lm_head") else VOCAB
    vocab = min(vocab, VOCAB)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 12), generator=gen)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, 9:] = -100
    return ids, labels


def _loss_and_grads(model, ids, labels):
    import torch

    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # router jitter and the like draw the same in both runs
    output = model(input_ids=ids, labels=labels)
    output.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return output.loss.detach(), grads


def _far(got, want) -> float:
    """How far ``got`` is from ``want``, in units of the tolerance (<= 1 is within it)."""
    if got.shape != want.shape:
        return math.inf
    excess = (got - want).abs() / (TOL + TOL * want.abs())
    return float(excess.max()) if excess.numel() else 0.0


def run_one(model_type: str, class_name: str) -> dict[str, Any]:
    """The row of one family (called in the child process)."""
    import torch

    from lossplug.integrations.transformers import patch_causal_lm, patched_models, pop_token_stats

    row: dict[str, Any] = {"family": model_type, "class": class_name, "tiny": False}
    model, build_error = None, ""
    for sizes in (TINY, WIDER):
        try:
            model = _build(model_type, class_name, sizes)
            ids, labels = _batch(model)
            want_loss, want = _loss_and_grads(model, ids, labels)
            if not torch.isfinite(want_loss):
                raise ValueError(f"the unpatched loss is {float(want_loss)}")
            break
        except Exception as error:
            model, build_error = None, f"{type(error).__name__}: {error}"
    if model is None:
        row.update(result="no tiny build", detail=build_error.splitlines()[0][:160])
        return row
    row["tiny"] = True
    row["params"] = sum(p.numel() for p in model.parameters())
    patched = copy.deepcopy(model)
    try:
        patch_causal_lm(patched, backend="torch")
    except (ValueError, TypeError) as error:
        reason = str(error).split(": ", 1)[-1].split("; fallback:")[0]
        row.update(result="refused", detail=reason[:200])
        return row
    (inner,) = patched_models(patched)  # the model itself, or the language model inside it
    fold = inner._lossplug_patch
    row["fold"] = {"scale": fold.scale, "softcap": fold.spec.softcap}
    try:
        got_loss, got = _loss_and_grads(patched, ids, labels)
    except Exception as error:
        row.update(result="error", detail=f"{type(error).__name__}: {error}"[:200])
        return row
    if pop_token_stats(patched) is None:  # the fused loss never ran: nothing was checked
        row.update(result="error", detail="patched, but the fused loss did not run")
        return row
    far = {"loss": _far(got_loss, want_loss)}
    if got.keys() != want.keys():
        row.update(result="differs", detail="not the same parameters have gradients")
        return row
    far.update({name: _far(got[name], want[name]) for name in want})
    worst = max(far, key=far.get)
    row["worst"] = far[worst]
    if far[worst] <= 1.0:
        row.update(result="exact", detail=_fold_text(row["fold"]))
        return row
    detail = f"{worst}: {far[worst]:.3g}x the tolerance"
    # beyond the tolerance: is the patched fp32 value farther from the fp64 computation than
    # the unpatched fp32 value is? (no: fp32 rounding, in a model that amplifies it)
    wide = copy.deepcopy(model).double()
    exact_loss, exact = _loss_and_grads(wide, ids, labels)
    exact = {"loss": exact_loss, **exact}
    got, want = {"loss": got_loss, **got}, {"loss": want_loss, **want}
    ours = max(_error(got[n], exact[n]) for n in exact)
    theirs = max(_error(want[n], exact[n]) for n in exact)
    row["vs_fp64"] = {"patched": ours, "unpatched": theirs}
    if ours <= 2 * theirs:
        row.update(result="rounding", detail=f"{detail}; vs fp64: {ours:.2g} patched, "
                   f"{theirs:.2g} unpatched (relative to each tensor's largest value)")  # fmt: skip
    else:
        row.update(result="differs", detail=detail)
    return row


def _error(got, exact) -> float:
    """The largest error of fp32 ``got`` against fp64 ``exact``, relative to its largest value."""
    scale = float(exact.abs().max()) if exact.numel() else 0.0
    return float((got.double() - exact).abs().max()) / scale if scale else 0.0


def _fold_text(fold: dict[str, Any]) -> str:
    parts = []
    if fold["scale"] != 1.0:
        parts.append(f"logit scale {fold['scale']:.6g}")
    if fold["softcap"] is not None:
        parts.append(f"softcap {fold['softcap']:g}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# all families, one process each


def _failed(model_type: str, class_name: str, detail: str) -> dict[str, Any]:
    return {"family": model_type, "class": class_name, "tiny": False,
            "result": "no tiny build", "detail": detail[:200]}  # fmt: skip


def _forked(model_type: str, class_name: str, send: Any) -> None:
    """The child: one family's row, sent back through ``send``."""
    try:
        row = run_one(model_type, class_name)
    except Exception as error:  # a bug of this script, kept on its row
        row = _failed(model_type, class_name, f"{type(error).__name__}: {error}")
    send.send(row)
    send.close()


def run_all(todo: list[tuple[str, str]], jobs: int, timeout: float) -> list[dict[str, Any]]:
    """One forked process per family, ``jobs`` at a time, each killed after ``timeout``.

    Forked from this process, which has imported torch, transformers and lossplug but run
    nothing (no thread pool to inherit): a family costs its own build and run, not the imports.
    """
    import multiprocessing
    from multiprocessing.connection import wait

    fork = multiprocessing.get_context("fork")
    waiting, running, rows = list(reversed(todo)), {}, []

    def done(conn: Any, row: dict[str, Any]) -> None:
        process, started = running.pop(conn)[:2]
        process.join(5)
        if process.is_alive():
            process.kill()
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        print(f"{row['family']:<28} {row['result']:<14} {row.get('detail', '')}"[:150],
              file=sys.stderr, flush=True)  # fmt: skip

    while waiting or running:
        while waiting and len(running) < jobs:
            model_type, class_name = waiting.pop()
            receive, send = fork.Pipe(duplex=False)
            process = fork.Process(target=_forked, args=(model_type, class_name, send))
            process.start()
            send.close()
            running[receive] = (process, time.perf_counter(), model_type, class_name)
        for conn in wait(list(running), timeout=1.0):
            process, started, model_type, class_name = running[conn]
            try:
                row = conn.recv()
            except EOFError:  # the process died without a row
                process.join(5)
                row = _failed(model_type, class_name, f"crashed (rc {process.exitcode})")
            done(conn, row)
        now = time.perf_counter()
        for conn, (process, started, model_type, class_name) in list(running.items()):
            if now - started > timeout:
                process.kill()
                row = _failed(model_type, class_name, f"timed out after {timeout:g} s")
                done(conn, row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table and its summary line."""
    lines = ["| family | class | builds tiny | result | detail |", "|---|---|---|---|---|"]
    for row in rows:
        detail = str(row.get("detail", "")).replace("|", "\\|").replace("\n", " ")
        tiny = "yes" if row["tiny"] else "no"
        lines.append(f"| {row['family']} | {row['class']} | {tiny} | {row['result']} | {detail} |")
    return "\n".join(lines) + "\n\n" + summary(rows)


def summary(rows: list[dict[str, Any]]) -> str:
    tiny = [row for row in rows if row["tiny"]]
    count = {kind: sum(row["result"] == kind for row in tiny) for kind in
             ("exact", "rounding", "refused", "differs", "error")}  # fmt: skip
    share = 100 * count["exact"] / len(tiny) if tiny else 0.0
    return (
        f"{len(rows)} families, {len(tiny)} build tiny: {count['exact']} exact ({share:.1f}%), "
        f"{count['rounding']} beyond 1e-5 by fp32 rounding only (no farther from fp64 than the "
        f"unpatched model), {count['refused']} refused (each with its reason), "
        f"{count['differs']} differ, "
        f"{count['error']} error"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated model types")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per family")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts: one thread a family
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    import transformers

    import lossplug.integrations.transformers  # noqa: F401 (imported once, before the forks)

    todo = families()
    if args.only:
        wanted = set(args.only.split(","))
        todo = [(t, c) for t, c in todo if t in wanted or c in wanted]
    started = time.perf_counter()
    rows = run_all(todo, args.jobs, args.timeout)
    rows.sort(key=lambda row: row["family"])
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{platform.machine()} {os.cpu_count()}-core, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, "
          f"{time.perf_counter() - started:.0f} s\n")  # fmt: skip
    print(table(rows))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
