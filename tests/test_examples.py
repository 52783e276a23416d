"""The README's main job and the code speed-up template, run as a user runs them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lossplug.loggers import read_run

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_example(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    # Nothing of this process's W&B reaches the example: not a key, and not WANDB_SERVICE, which
    # W&B sets once a run has started here and which would make the example log through this
    # process's W&B service (which resolves relative folders against its own working directory).
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune")
    done = run_example(
        str(ROOT / "examples" / "finetune.py"), "--max-steps", "30", "--out", str(out), cwd=out
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done


def test_finetune_logs_model_and_business_metrics_that_improve(finetune_run):
    out, _ = finetune_run
    run = read_run(out / "wandb")
    assert run.complete, run.errors
    train = [value for _, value in run.series("train/perplexity")]
    val = [value for _, value in run.series("val/perplexity")]
    assert len(train) >= 3 and train[-1] < train[0]
    assert len(val) >= 2 and val[-1] < val[0]  # validated at least twice in 30 steps
    for key in ("kpi/throughput/tokens_per_sec", "kpi/cost/total", "kpi/code_tokenizes"):
        assert run.series(key), key


def test_finetune_validates_code_and_prose_slices_that_add_up(finetune_run):
    out, _ = finetune_run
    run = read_run(out / "wandb")
    steps = [step for step, _ in run.series("val/perplexity")]
    for name in ("code", "prose"):
        assert [step for step, _ in run.series(f"val/perplexity/{name}")] == steps, name
    for step, tokens in run.series("val/tokens"):
        parts = [dict(run.series(f"val/tokens/{name}"))[step] for name in ("code", "prose")]
        assert sum(parts) == tokens and min(parts) > 0
        nll = sum(
            dict(run.series(f"val/cross_entropy/{name}"))[step] * part
            for name, part in zip(("code", "prose"), parts, strict=True)
        )
        overall = dict(run.series("val/cross_entropy"))[step]
        assert abs(nll / tokens - overall) <= 1e-9 * overall
    # prose is not what the model learns from: its perplexity is the higher one
    last = {name: run.series(f"val/perplexity/{name}")[-1][1] for name in ("code", "prose")}
    assert last["prose"] > last["code"]


def test_finetune_prints_the_table_the_sync_command_and_writes_the_plot(finetune_run):
    out, done = finetune_run
    stdout = done.stdout
    for text in ("train/perplexity", "val/perplexity", "kpi/code_tokenizes", "wandb sync"):
        assert text in stdout, text
    plot = out / "finetune.png"
    assert plot.read_bytes()[:8] == PNG_SIGNATURE and plot.stat().st_size > 1000


def test_report_reads_the_run_back(finetune_run):
    out, _ = finetune_run
    png = out / "report.png"
    done = run_example("-m", "lossplug.cli", "report", str(out), "--plot", str(png), cwd=out)
    assert done.returncode == 0, done.stderr
    assert "val/perplexity" in done.stdout and "kpi/cost/total" in done.stdout
    assert png.read_bytes()[:8] == PNG_SIGNATURE


def test_the_main_job_says_how_to_compare_two_runs_and_that_works(finetune_run):
    out, done = finetune_run
    lines = done.stdout.splitlines()
    at = lines.index("compare with a second run:")
    train, report = (line.strip().split() for line in lines[at + 1 : at + 3])
    assert train[:2] == ["python", "examples/finetune.py"] and report[:2] == ["lossplug", "report"]
    second = run_example(str(ROOT / train[1]), *train[2:], "--max-steps", "30", cwd=out)
    assert second.returncode == 0, second.stderr[-3000:]
    compared = run_example("-m", "lossplug.cli", *report[1:], cwd=out)
    assert compared.returncode == 0, compared.stderr
    table = compared.stdout.splitlines()
    assert table[0] == "2 runs compared; each cell: final (best@step)"
    assert "val/perplexity" in table[1] and "kpi/code_tokenizes" in table[1]
    assert "cost USD (kpi/cost/total)" in table[1]
    # unnamed runs are called by the folders the command names
    assert [line.split()[0] for line in table[2:4]] == [report[2], report[3]]
    assert (out / "compare.png").read_bytes()[:8] == PNG_SIGNATURE


def test_the_readme_quickstart_runs_as_pasted(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "quickstart.py").write_text(code)
    done = run_example("quickstart.py", cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = read_run(tmp_path, wait=30)
    assert run.complete and len(run.series("val/perplexity")) >= 3
    assert run.series("kpi/cost/total") and run.config["lossplug_kpis"]["kpi/cost"]["unit"] == "USD"
    report = run_example("-m", "lossplug.cli", "report", ".", cwd=tmp_path)
    assert report.returncode == 0 and "val/perplexity" in report.stdout, report.stderr


def _save_tiny_hf_model(path: Path) -> None:
    """A tiny GPT-2 and a byte-level BPE tokenizer trained here: nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(
        ["def f(x):\n    return x + 1\n", "import os\nclass A:\n    pass\n"], trainer=trainer
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(path)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(path)


def test_finetune_a_local_hugging_face_model(tmp_path):
    model_dir = tmp_path / "tiny-gpt2"
    _save_tiny_hf_model(model_dir)
    out = tmp_path / "runs"
    done = run_example(
        str(ROOT / "examples" / "finetune.py"),
        "--hf-model",
        str(model_dir),
        "--max-steps",
        "12",
        "--seq-len",
        "64",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = read_run(out / "wandb")
    val = [value for _, value in run.series("val/perplexity")]
    assert len(val) >= 2 and val[-1] < val[0]
    assert run.series("kpi/code_tokenizes")  # generated through Hugging Face generate()


def test_code_speedup_template_runs_as_is(tmp_path):
    done = run_example(str(ROOT / "examples" / "code_speedup.py"), "--timeout", "20", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "kpi/code_speedup/compile_rate    0.6667" in done.stdout
    assert "programs ran in: bwrap (sandbox='bwrap')" in done.stdout
    assert "kpi/code_speedup/correct_rate    0.3333" in done.stdout
    assert "x faster" in done.stdout and "wrong answer" in done.stdout
    assert "compile error" in done.stdout


def test_hf_trainer_example_logs_exact_metrics_and_kpis_to_wandb(tmp_path):
    done = run_example(
        str(ROOT / "examples" / "hf_trainer.py"), "--max-steps", "12", "--out", "runs", cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "val/perplexity" in done.stdout and "wandb sync" in done.stdout
    run = read_run(tmp_path / "runs" / "wandb")
    assert run.complete, run.errors
    train = [value for _, value in run.series("train/perplexity")]
    val = [value for _, value in run.series("val/perplexity")]
    assert len(train) >= 3 and train[-1] < train[0]
    assert len(val) >= 2 and val[-1] < val[0]
    for key in ("kpi/throughput/tokens_per_sec", "kpi/cost/total"):
        assert run.series(key), key
    # the eval set's two slices add up to it, token-weighted, at every evaluation
    overall = dict(run.series("val/cross_entropy"))
    tokens = dict(run.series("val/tokens"))
    parts = {
        kind: (
            dict(run.series(f"val/cross_entropy/{kind}")),
            dict(run.series(f"val/tokens/{kind}")),
        )
        for kind in ("code", "prose")
    }
    assert overall and set(overall) == set(parts["code"][0]) == set(parts["prose"][0])
    for step, value in overall.items():
        assert sum(n[step] for _, n in parts.values()) == tokens[step]
        mixed = sum(ce[step] * n[step] for ce, n in parts.values()) / tokens[step]
        assert mixed == pytest.approx(value, rel=1e-5)
    generated = dict(run.series("kpi/code_tokenizes"))
    assert set(generated) == set(overall)  # the generation KPI runs at each evaluation
    assert all(0.0 <= v <= 1.0 for v in generated.values())
    assert re.search(r"\n[+-]?[\d.]+ +\d+ +kpi/code_tokenizes +val/perplexity/prose ", done.stdout)
