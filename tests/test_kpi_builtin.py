"""Built-in KPIs: throughput, cost, time to target, generation and code speed-up."""

from __future__ import annotations

import math

import pytest
import torch

import lossplug
from _programs import (
    DOES_NOT_COMPILE_CPP,
    LOOPS_FOREVER_CPP,
    OFF_BY_ONE_CPP,
    SUM_OF_SQUARES_CPP,
    SUM_OF_SQUARES_PY,
)
from _tiny_lm import NAMESPACES, make_loader, quiet_trainer
from lossplug.kpi import KPIContext
from lossplug.kpi.builtin import (
    CodeSpeedup,
    GenerationKPI,
    Throughput,
    TimeToTarget,
    TrainingCost,
)

_, TinyLM, Recorder = NAMESPACES["lightning.pytorch"]


def test_throughput_cost_and_time_to_target_in_a_trainer(tmp_path):
    recorder = Recorder()
    kpis = [
        Throughput(every_n_steps=2),
        TrainingCost(price_per_device_hour=3600.0, every_n_steps=2),  # $1 per device-second
        TimeToTarget("val/perplexity", target=1e6),
    ]
    callbacks = [lossplug.LossMonitor(log_every_n_steps=2), lossplug.KPIMonitor(kpis)]
    trainer = quiet_trainer(
        tmp_path, recorder, callbacks, max_steps=6, val_check_interval=3, limit_val_batches=1
    )
    trainer.fit(TinyLM(), make_loader(6), make_loader(1, seed=3))
    tokens = dict(recorder.series("train/tokens"))
    rates = dict(recorder.series("kpi/throughput/tokens_per_sec"))
    assert sorted(rates) == [2, 4, 6] and all(rate > 0 for rate in rates.values())
    samples = dict(recorder.series("kpi/throughput/samples_per_sec"))
    assert all(rate > 0 for rate in samples.values())
    totals = dict(recorder.series("kpi/cost/total"))
    per_million = dict(recorder.series("kpi/cost/per_million_tokens"))
    assert totals[2] < totals[4] < totals[6]  # cumulative
    for step in (2, 4, 6):
        assert math.isclose(per_million[step], totals[step] / (tokens[step] / 1e6), rel_tol=1e-9)
    # reached at the first validation (step 3); the same values at the next validation and at
    # the end of the epoch (both at step 6)
    reached = recorder.series("kpi/time_to_val_perplexity/step")
    assert reached == [(3, 3.0), (6, 3.0), (6, 3.0)]


def test_cost_and_time_to_target_continue_across_a_resume():
    cost = TrainingCost(price_per_device_hour=1.0, devices=2)
    cost.fn(KPIContext(step=1, elapsed_s=1800.0))
    saved = cost.state_dict()
    resumed = TrainingCost(price_per_device_hour=1.0, devices=2)
    resumed.load_state_dict(saved)
    # the new process's clock starts again at 0: the first hour-and-a-half still counts
    values = resumed.fn(KPIContext(step=2, elapsed_s=900.0, tokens=2_000_000))
    assert values["total"] == pytest.approx((1800 + 900) / 3600 * 2)
    assert values["per_million_tokens"] == pytest.approx(values["total"] / 2)

    target = TimeToTarget("val/loss", 1.0, name="ttt")
    assert target.fn(KPIContext(step=3, elapsed_s=50.0, metrics={"val/loss": 2.0})) is None
    again = TimeToTarget("val/loss", 1.0, name="ttt")
    again.load_state_dict(target.state_dict())
    reached = again.fn(KPIContext(step=7, elapsed_s=10.0, metrics={"val/loss": 0.5}))
    assert reached == {"step": 7.0, "seconds_to_target": 60.0}


def test_generation_kpi_with_a_generate_function_and_with_hugging_face_generate():
    def generate_fn(ctx, prompts, max_new_tokens):
        return [p[::-1][:max_new_tokens] for p in prompts]

    kpi = GenerationKPI(
        ["abc", "level", "xyz"],
        lambda prompt, output: float(prompt == output),  # palindromes score 1
        generate_fn=generate_fn,
        max_samples=2,
    )
    result = kpi.fn(KPIContext(step=1))
    assert result.value == 0.5
    assert [row["output"] for row in result.samples] == ["cba", "level"]

    class ByteTokenizer:
        """The parts of a Hugging Face tokenizer GenerationKPI uses."""

        pad_token, eos_token, pad_token_id, padding_side = None, "\0", 0, "right"

        def __call__(self, texts, return_tensors, padding):
            width = max(map(len, texts))
            ids = torch.tensor([[0] * (width - len(t)) + list(t.encode()) for t in texts])
            return _Batch(input_ids=ids, attention_mask=(ids != 0).long())

        def batch_decode(self, rows, skip_special_tokens):
            return [bytes(int(i) for i in row if i).decode() for row in rows]

    class EchoLastByte(torch.nn.Module):
        def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
            new = input_ids[:, -1:].repeat(1, max_new_tokens)
            return torch.cat([input_ids, new], dim=1)

    hf = GenerationKPI(
        ["ab", "c"],
        lambda prompt, output: float(output == prompt[-1] * 3),
        tokenizer=ByteTokenizer(),
        max_new_tokens=3,
    )
    result = hf.fn(KPIContext(step=1, model=EchoLastByte()))
    assert result.value == 1.0
    assert [row["output"] for row in result.samples] == ["bbb", "ccc"]


class _Batch(dict):
    def to(self, device):
        return self


# A program for CodeSpeedup's configuration tests: never run.
X = ("x", "1\n")


def test_code_speedup_reports_exactly_what_each_translation_does():
    translations = {
        "fast": SUM_OF_SQUARES_CPP,
        "wrong": OFF_BY_ONE_CPP,
        "broken": DOES_NOT_COMPILE_CPP,
        "forever": LOOPS_FOREVER_CPP,
    }
    order = list(translations)
    calls = iter(order)

    def translate(ctx, python_source):
        return translations[next(calls)]

    program = {"python": SUM_OF_SQUARES_PY, "inputs": ["2000000\n", "1000\n"]}
    kpi = CodeSpeedup([program] * 4, translate, program_timeout_s=2.0, repeats=2)
    result = kpi.fn(KPIContext(step=1))
    rows = {name: row for name, row in zip(order, result.samples, strict=True)}
    fast = rows["fast"]
    assert fast["correct"] and fast["optimised"] and fast["speedup"] > 1, fast["error"]
    assert fast["inputs"] == 2 and fast["spread"] is not None
    assert rows["wrong"]["compiled"] and not rows["wrong"]["correct"]
    assert "on input 2 of 2" in rows["wrong"]["error"] or "on input 1" in rows["wrong"]["error"]
    assert not rows["broken"]["compiled"] and "compile" in rows["broken"]["error"]
    assert rows["forever"]["compiled"] and "timed out" in rows["forever"]["error"]
    # PIE's aggregates: the failures count, as 1.0x, in the mean.
    assert result.value["compile_rate"] == 0.75
    assert result.value["correct_rate"] == 0.25
    assert result.value["optimised_rate"] == 0.25
    assert result.value["mean_speedup"] == pytest.approx((fast["speedup"] + 3.0) / 4)
    assert result.value["speedup"] == pytest.approx(fast["speedup"])
    assert kpi.primary == "mean_speedup"


@pytest.mark.parametrize(
    ("make", "error", "pattern"),
    [
        (lambda: TrainingCost(-1.0), ValueError, r"price_per_device_hour.*-1.0"),
        (lambda: TrainingCost(1.0, devices=0), ValueError, r"devices.*0"),
        (lambda: TimeToTarget("", 1.0), ValueError, r"metric must be"),
        (lambda: GenerationKPI([], lambda p, o: 1.0, generate_fn=print), ValueError, r"prompts"),
        (lambda: GenerationKPI(["a"], lambda p, o: 1.0), ValueError, r"generate_fn, or a tok"),
        (lambda: CodeSpeedup([3], lambda c, s: ""), ValueError, r"each program must be.*3"),
        (lambda: CodeSpeedup([X], "g++"), TypeError, r"translate must be callable"),
        (lambda: CodeSpeedup([X], print, memory_mb=8), ValueError, r"memory_mb must be >= 16"),
        (
            lambda: CodeSpeedup([X], print, compile_memory_mb=1.5),
            TypeError,
            r"compile_memory_mb must be an int, got float",
        ),
        (lambda: CodeSpeedup([X], print, sandbox="off"), ValueError, r"sandbox must be one of"),
    ],
)
def test_bad_builtin_configuration(make, error, pattern):
    with pytest.raises(error, match=pattern):
        make()


def test_code_speedup_default_timeout_covers_every_program():
    four = CodeSpeedup([X] * 4, lambda ctx, src: "", program_timeout_s=2.0)
    # each program: translated, compiled, then run 3 times (Python and C++) on its one input
    assert four.timeout_s == 4 * ((1 + 2 * 3) * 2.0 + 60.0)
    two_inputs = CodeSpeedup([("x", ["1", "2"])], lambda ctx, src: "", repeats=1)
    assert two_inputs.timeout_s == (1 + 2 * 2) * 10.0 + 60.0  # program_timeout_s: 10 s
    assert CodeSpeedup([X], lambda ctx, src: "", timeout_s=None).timeout_s is None
    assert CodeSpeedup([X], lambda ctx, src: "", timeout_s=5).timeout_s == 5.0


def test_builtins_that_run_user_code_get_the_kpi_default_timeout():
    user_code = [GenerationKPI(["a"], lambda p, o: 1.0, generate_fn=lambda ctx, p, n: p)]
    assert {kpi.timeout_s for kpi in user_code} == {lossplug.kpi.DEFAULT_TIMEOUT_S}
    # lossplug's own arithmetic on the context cannot hang: inline, no thread hand-over
    arithmetic = [Throughput(), TrainingCost(1.0), TimeToTarget("val/perplexity", 2.0)]
    assert {kpi.timeout_s for kpi in arithmetic} == {None}
    assert Throughput(timeout_s=5).timeout_s == 5.0


def test_training_cost_is_cumulative_with_no_best_and_no_target():
    cost = TrainingCost(price_per_device_hour=3600.0, every_n_steps=1)
    runner = lossplug.kpi.KPIRunner([cost])
    for step, elapsed in ((1, 1.0), (2, 3.0)):
        runner.run(cost, KPIContext(step=step, elapsed_s=elapsed, tokens=1000 * step))
    assert cost.is_cumulative("kpi/cost/total")
    assert cost.is_cumulative("kpi/cost/per_million_tokens")
    assert runner.states["cost"].best is None  # lower is better, yet the first cost is no best
    with pytest.raises(ValueError, match=r"target=100.0 is meaningless.*cumulative"):
        TrainingCost(1.0, target=100.0)


def test_time_to_target_default_name_holds_only_name_characters():
    assert TimeToTarget("val/loss epoch", 1.0).name == "time_to_val_loss_epoch"
    assert TimeToTarget("val/acc.", 1.0).name == "time_to_val_acc"


@pytest.mark.parametrize(
    ("make", "error", "pattern"),
    [
        (lambda: CodeSpeedup([X], print, program_timeout_s=0), ValueError, r"program_timeout"),
        (
            lambda: CodeSpeedup([X], print, program_timeout_s="9"),
            TypeError,
            r"program_timeout_s must be a number, got str",
        ),
        (lambda: TimeToTarget("val/x", 1.0, higher_is_better="yes"), TypeError, r"higher_is_b"),
        (lambda: Throughput("../up"), ValueError, r"name must be.*'\.\./up'"),
    ],
)
def test_more_bad_builtin_configuration(make, error, pattern):
    with pytest.raises(error, match=pattern):
        make()
