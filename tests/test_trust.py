"""What a hostile user tries: no data loss, one line and exit code 2 for every failure, no dead ends."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import tiny_hf_model, tiny_tokenizer
from stagcli.cli import app

runner = CliRunner()


def one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert fragment in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.fixture
def stag_dir(src, tmp_path):
    out = tmp_path / "stag"
    assert runner.invoke(app, ["convert", str(src), str(out)]).exit_code == 0
    return out


# --- data loss -------------------------------------------------------------------------------------
def snapshot(root: Path):
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


@pytest.mark.parametrize("target, fragment", [
    ("{src}", "is or contains"), ("{tmp}", "is or contains"), (".", "the current directory"),
    ("{src}/inner", "inside the source"), ("{tmp}/mine", "not one"),
])
def test_force_never_deletes_what_is_not_a_stag_output(src, tmp_path, monkeypatch, target, fragment):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    out = target.format(src=src, tmp=tmp_path)
    one_line_error(runner.invoke(app, ["convert", str(src), out, "--force"]), fragment)
    assert snapshot(tmp_path) == before  # nothing touched


def test_force_replaces_a_previous_output_and_cleans_dead_temporaries(src, stag_dir, tmp_path):
    stale = tmp_path / f".{stag_dir.name}.stag-tmp-999999999-abcdef"  # left by a kill -9 (no such pid)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    result = runner.invoke(app, ["convert", str(src), str(stag_dir), "--sections", "4", "--force"])
    assert result.exit_code == 0, result.output
    assert json.loads((stag_dir / "config.json").read_text())["sections"] == 4
    assert not stale.exists()
    assert not [p for p in tmp_path.iterdir() if ".stag-tmp-" in p.name]


def test_unwritable_output_fails_before_loading(src):
    one_line_error(runner.invoke(app, ["convert", str(src), "/proc/stag-out/x"]), "cannot write")


def test_disk_full_is_one_line(src, tmp_path, monkeypatch):
    from stagcli.model import StagForCausalLM

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "model.safetensors"))
    monkeypatch.setattr(StagForCausalLM, "save_pretrained", full)
    one_line_error(runner.invoke(app, ["convert", str(src), str(tmp_path / "out")]), "no space left")
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".stag-tmp-" in p.name]


def test_experiment_results_default_under_the_run_output():
    from typer.main import get_command
    params = {p.name: p for p in get_command(app).commands["experiment"].params}
    assert params["results"].default is None and "OUT/results" in params["results"].help


# --- one line, exit 2 -------------------------------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["generate", "{m}", "-p", "hi", "--device", "bogus"], "not a device name"),
    (["generate", "{m}", "-p", "hi", "--device", "cuda"], "no CUDA GPU"),
    (["generate", "{m}", "-p", "hi", "--dtype", "foo"], "--dtype must be one of"),
    (["generate", "{m}", "-p", "hi", "-p", "", "-n", "2"], "prompt 2 of 2 is empty"),
    (["generate", "{m}", "-p", "hi", "-n", "100000000"], "exceed the model's context of 128 tokens"),
    (["bench", "{m}", "--batch-sizes", "0"], "--batch-sizes must be positive"),
    (["bench", "{m}", "--batch-sizes", "-2"], "--batch-sizes must be positive"),
    (["bench", "{m}", "--batch-sizes", ""], "--batch-sizes must be positive"),
    (["bench", "{m}", "--device", "cuda:7"], "no CUDA GPU"),
])
def test_bad_input_is_one_line(stag_dir, args, fragment):
    if "cuda" in " ".join(args):
        import torch
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    one_line_error(runner.invoke(app, [a.format(m=stag_dir) for a in args]), fragment)


def test_gpt2_past_its_positions_is_one_line(tmp_path):
    src = tmp_path / "gpt2"
    tiny_hf_model("gpt2").save_pretrained(src)
    tiny_tokenizer(src)
    one_line_error(runner.invoke(app, ["generate", str(src), "-p", "x" * 200, "-n", "2"]), "context of 128")


def test_unexpected_exceptions_are_one_line_with_a_debug_hint(stag_dir, monkeypatch):
    import stagcli.convert as convert

    def broken(*a, **k):
        raise RuntimeError("something odd\nsecond line")
    monkeypatch.setattr(convert, "load_model", broken)
    result = runner.invoke(app, ["generate", str(stag_dir), "-p", "hi"])
    one_line_error(result, "RuntimeError: something odd")
    assert "STAG_DEBUG=1" in result.output
    monkeypatch.setenv("STAG_DEBUG", "1")
    result = runner.invoke(app, ["generate", str(stag_dir), "-p", "hi"])
    assert isinstance(result.exception, RuntimeError)  # the traceback is the user's to see


def test_brackets_survive_in_help_and_errors():
    result = runner.invoke(app, ["finetune", "--help"], env={"COLUMNS": "250"})
    assert "[default: 8]" in result.output and "[default: 0.0003]" in result.output
    from stagcli.decode import generate
    import torch
    from stagcli.convert import convert_model
    from stagcli.errors import StagError
    with pytest.raises(StagError, match=r"\(batch, length\)"):
        generate(convert_model(tiny_hf_model("llama")), torch.zeros(3, dtype=torch.long))


# --- no dead ends -----------------------------------------------------------------------------------
def test_a_run_killed_before_its_first_checkpoint_can_resume_or_restart(stag_dir, corpus, tmp_path):
    from stagcli.train import Callback, TrainConfig, finetune_paths

    class Kill(Callback):
        def on_step(self, row):
            raise KeyboardInterrupt

    cfg = TrainConfig(data=[str(corpus)], seq_len=32, batch_size=4, max_steps=3, save_every=100,
                      save_every_minutes=0, eval_sequences=2)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        finetune_paths(str(stag_dir), out, cfg, callbacks=[Kill()])
    result = runner.invoke(app, ["finetune", str(stag_dir), str(out), "-d", str(corpus)])
    one_line_error(result, "--force")
    result = runner.invoke(app, ["finetune", str(out), "--resume"])  # nothing to resume: starts over
    assert result.exit_code == 0, result.output
    assert (out / "config.json").is_file()
    result = runner.invoke(app, ["finetune", str(stag_dir), str(out), "-d", str(corpus), "--seq-len", "32",
                                 "--max-steps", "1", "--force"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()] == [0, 1]


def test_resume_without_a_run_says_so(tmp_path):
    one_line_error(runner.invoke(app, ["finetune", str(tmp_path / "nothing"), "--resume"]), "holds no fine-tuning run")


def test_checkpoints_on_a_time_interval(stag_dir, corpus, tmp_path):
    from stagcli.train import Callback, TrainConfig, finetune_paths
    saved = []

    class Saves(Callback):
        def on_checkpoint(self, step, path):
            saved.append(step)

    cfg = TrainConfig(data=[str(corpus)], seq_len=32, batch_size=4, max_steps=3, save_every=100,
                      save_every_minutes=1e-9, eval_sequences=2)  # "minutes" have always passed
    finetune_paths(str(stag_dir), tmp_path / "run", cfg, callbacks=[Saves()])
    assert saved == [1, 2, 3]


def test_bench_says_slower_when_it_is(stag_dir, src, monkeypatch):
    import stagcli.bench as bench
    real = bench.bench_engine

    def slow_staggered(model, batch, **kw):
        row = real(model, batch, **kw)
        if getattr(model, "config", None) is not None and model.config.sections == 2:
            row["ms_per_token"] *= 100  # pretend the staggered model is much slower
        return row
    monkeypatch.setattr(bench, "bench_engine", slow_staggered)
    result = runner.invoke(app, ["bench", str(stag_dir), "--baseline", str(src), "--batch-sizes", "1", "--no-hf",
                                 "--prompt-len", "4", "--new-tokens", "3", "--repeats", "1"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "slower" in result.output and "faster" not in result.output


def test_exit_code_and_one_line_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stagcli", "generate", str(tmp_path / "none"), "-p", "x",
                           "--dtype", "foo"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "\n" not in proc.stderr.strip()
