"""``benchmarks/precision.py``'s bookkeeping: merging earlier outputs, and the README table written from the JSON."""

import json
import pathlib

import pytest

from benchmarks import precision

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _examples_output(seeds, steps, loss_of_seed):
  entries = {name: {"per_seed": [loss_of_seed(s) for s in seeds], "seeds": list(seeds), "steps": steps,
                    "train_time_s": 1.0} for name in precision.example_names("cnn_digits")[0]}
  return {"settings": {"seeds": list(seeds), "example_steps": steps}, "examples": {"cnn_digits": entries}}


def test_merge_adds_the_missing_seeds_and_keeps_this_runs_own():
  result = _examples_output([1, 2], 100, lambda s: 10.0 + s)
  precision.merge_earlier(result, _examples_output([0, 1], 100, lambda s: 20.0 + s))
  for entry in result["examples"]["cnn_digits"].values():
    assert entry["seeds"] == [0, 1, 2]
    assert entry["per_seed"] == [20.0, 11.0, 12.0]  # seed 1 from this run, seed 0 from the merged file


def test_merge_refuses_runs_of_another_step_count():
  result = _examples_output([1], 100, float)
  with pytest.raises(ValueError, match="300 steps"):
    precision.merge_earlier(result, _examples_output([0], 300, float))


def test_merge_unions_illcond_problems_of_the_same_settings():
  settings = {"seeds": [0, 1, 2], "illcond_steps": 200, "illcond_lrs": [0.1, 1.0], "illcond_rows": ["shampoo4"]}
  summary = {"best_mean": 1.0, "best_std": 0.1, "best_lr": 0.1}
  result = {"settings": dict(settings, problems=["a"]), "illcond": {"a": {"shampoo4@highest": summary}}}
  precision.merge_earlier(result, {"settings": dict(settings, problems=["b"]),
                                   "illcond": {"b": {"shampoo4@highest": summary, "soap4_4bit@highest": summary}}})
  assert result["settings"]["problems"] == ["a", "b"]
  rerun = {"settings": dict(settings, problems=["a"]),
           "illcond": {"a": {"soap4_4bit@highest": dict(summary, best_mean=2.0)}}}
  precision.merge_earlier(rerun, result)  # a rerun of one row: the problem's other rows come from the earlier file
  assert list(rerun["illcond"]["a"]) == ["shampoo4@highest", "soap4_4bit@highest"]
  assert rerun["illcond"]["a"]["soap4_4bit@highest"]["best_mean"] == 2.0  # the rerun's own row wins
  assert set(rerun["illcond"]) == {"a", "b"}
  other = dict(settings, illcond_steps=300)
  with pytest.raises(ValueError, match="illcond_steps"):
    precision.merge_earlier(result, {"settings": other, "illcond": {"c": {"shampoo4@highest": summary}}})


def test_readme_table_is_the_one_written_from_the_json():
  result = json.loads((ROOT / "benchmarks" / "results" / "precision.json").read_text())
  readme = (ROOT / "README.md").read_text()
  start, end = (readme.index(marker) for marker in precision.README_MARKERS)
  written = readme[start + len(precision.README_MARKERS[0]):end].strip()
  assert written == precision.readme_table(precision.rows(result)).strip()
  assert written.count("\n") == 1 + len({r["task"] for r in result["table"]})  # header, rule, one row per task
