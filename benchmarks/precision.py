r"""Precision of the every-step products: 4-bit Shampoo and 4-bit SOAP at each ``precision``.

The ``precision=`` option of :func:`~optax_shampoo4.scale_by_shampoo4` and
:func:`~optax_shampoo4.scale_by_soap4` sets the per-step products only
(:func:`optax_shampoo4.linalg.step_matmul`): ``"highest"`` (float32 operands),
``"high"`` (bf16x3) or ``"default"`` (bfloat16 operands, float32 accumulation).
On CPU the bf16 products are computed exactly as an accelerator's bf16 pass with
float32 accumulation would (bf16 products are exact in float32; only the
summation order differs), so their effect on quality is measured here:

* ``--part examples``: the three examples (``examples/*.py``) for 4-bit Shampoo
  (the example's base + ``shampoo4``, the quality benchmark's row: SGDM on the
  CNN, AdamW on the others) and ``soap4`` (at the SOAP comparison's learning
  rates, ``benchmarks/quality.py``'s ``SOAP_RUNS``), each precision a variant
  name of ``examples/variants.py`` (suffix ``_bf16x3`` / ``_bf16``). Metric:
  final training loss (mean over the last 10 % of steps).
* ``--part illcond``: problems of ``benchmarks/illcond.py`` for its ``shampoo4``
  and ``soap4_4bit`` rows at each precision (``illcond.py --precision``), each
  swept over learning rates. Metric: the best learning rate's mean
  suboptimality (final loss for ``mlp``).

The table gives per row the 3-seed mean, the spread (max - min over seeds, or
the standard deviation for illcond) and the ratio to the ``"highest"`` row. The
criterion for a bf16 default: ``"default"`` within 1 % of ``"highest"`` everywhere.

  python benchmarks/precision.py --part examples --steps 100 --out benchmarks/results/precision_examples.json
  python benchmarks/precision.py --part illcond --problems ls_power_1e4 logreg_wine mlp \
      --out benchmarks/results/precision_illcond.json
  python benchmarks/precision.py --table benchmarks/results/precision_examples.json   # print a written file
  python benchmarks/precision.py --part examples --from-runs --merge benchmarks/results/precision_illcond.json \
      --out benchmarks/results/precision.json   # the per-run files present plus the illcond part, one file

``--merge`` takes from earlier outputs their illcond problems (same steps, seeds
and learning rates) and the example seeds this run lacks (same step count), so
a run of further seeds or problems extends a written file. The README's table:

  python benchmarks/precision.py --table benchmarks/results/precision.json --readme README.md
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "examples", ROOT / "benchmarks"):
  if str(_path) not in sys.path:
    sys.path.insert(0, str(_path))

import common  # noqa: E402  (examples/common.py)
import quality  # noqa: E402  (benchmarks/quality.py)

PRECISIONS = ("highest", "high", "default")
# precision -> the variant-name suffix of examples/variants.py ("" is the library default)
SUFFIXES = {"highest": "", "high": "_bf16x3", "default": "_bf16"}
# example -> SOAP's learning rate there (quality.SOAP_RUNS; None: the example's own)
SOAP_LR = {"cnn_digits": "3e-3", "transformer_lm": None, "autoencoder_mnist": "1e-2"}
ILLCOND_ROWS = ("shampoo4", "soap4_4bit")
METHODS = ("shampoo4", "soap4")  # --methods: the examples' names for ILLCOND_ROWS
README_MARKERS = ("<!-- precision table: python benchmarks/precision.py --table "
                  "benchmarks/results/precision.json --readme README.md -->", "<!-- end of precision table -->")


def example_names(example: str, methods: tuple[str, ...] = METHODS) -> tuple[list[str], list[str]]:
  """``(optimizer names, --lr-for entries)`` of one example: every precision of 4-bit Shampoo and 4-bit SOAP
  (of those in ``methods``)."""
  shampoo = [f"{quality.BASES[example]}+shampoo4{SUFFIXES[p]}" for p in PRECISIONS] if "shampoo4" in methods else []
  soap = [f"soap4{SUFFIXES[p]}" for p in PRECISIONS] if "soap4" in methods else []
  lr = SOAP_LR[example]
  return shampoo + soap, ([] if lr is None or not soap else [f"{name}={lr}" for name in soap])


def run_examples(args: argparse.Namespace) -> dict:
  """``{example: {optimizer: {"per_seed": [...], "seconds": ...}}}`` of final training losses."""
  out = {}
  for example in args.examples:
    module = quality.load_example(example)
    names, lr_for = example_names(example, tuple(args.methods))
    finals = {name: [] for name in names}
    seconds = {name: 0.0 for name in names}
    for seed in args.seeds:
      run_file = args.runs_dir / f"{example}_seed{seed}.json"
      argv = ["--seed", str(seed), "--steps", str(args.steps), "--out", str(run_file), "--optimizers", *names]
      results = module.main(argv + (["--lr-for", *lr_for] if lr_for else []))
      for name in names:
        finals[name].append(float(results[name]["final_train_loss"]))
        seconds[name] += float(results[name]["train_time_s"])
    out[example] = {name: {"per_seed": finals[name], "train_time_s": seconds[name] / len(args.seeds),
                           "seeds": list(args.seeds), "steps": args.steps} for name in names}
  return out


def examples_from_runs(args: argparse.Namespace) -> dict:
  """:func:`run_examples`' result read back from the per-run files in ``--runs-dir`` (the seeds present)."""
  out = {}
  for example in args.examples:
    files = [args.runs_dir / f"{example}_seed{seed}.json" for seed in args.seeds]
    written = [json.loads(f.read_text()) for f in files if f.exists()]
    if not written:
      continue
    names, _ = example_names(example, tuple(args.methods))
    steps = {w["config"]["steps"] for w in written}
    if steps != {args.steps}:
      raise ValueError(f"{example}: the runs in {args.runs_dir} have steps {sorted(steps)}, --steps {args.steps}")
    out[example] = {name: {"per_seed": [w["results"][name]["final_train_loss"] for w in written],
                           "train_time_s": float(np.mean([w["results"][name]["train_time_s"] for w in written])),
                           "seeds": [w["config"]["seed"] for w in written],
                           "steps": written[0]["config"]["steps"]} for name in names}
  return out


def run_illcond(args: argparse.Namespace) -> dict:
  """``{problem: {row@precision: illcond summary}}``: each row swept over learning rates per precision."""
  import illcond  # noqa: PLC0415  (benchmarks/illcond.py; jax-heavy, only for this part)

  if args.lrs:
    illcond.BASE_LRS = tuple(sorted(args.lrs))
  out = {}
  for name in args.problems:
    build, loss = illcond.PROBLEMS[name]
    problems = [build(seed) for seed in args.seeds]
    out[name] = {}
    for row in (r for r, m in zip(ILLCOND_ROWS, METHODS) if m in args.methods):
      for precision in PRECISIONS:
        start = time.perf_counter()
        trainer = illcond.make_trainer(illcond.make_row(row, precision), loss, args.illcond_steps)
        summary = illcond.summarize(illcond.sweep(trainer, problems, loss))
        summary["seconds"] = time.perf_counter() - start
        out[name][f"{row}@{precision}"] = summary
        print(f"{name} {row}@{precision}: best lr {summary['best_lr']:.2g}, mean {summary['best_mean']:.4g}",
              flush=True)
  return out


def illcond_seeds(settings: dict) -> list[int]:
  """The seeds of the illcond part (files written before ``illcond_seeds`` existed: ``seeds``)."""
  return settings.get("illcond_seeds", settings.get("seeds", []))


def _ordered_rows(by_row: dict) -> dict:
  """An illcond problem's ``row@precision`` entries in the order of ILLCOND_ROWS and PRECISIONS."""
  order = [f"{row}@{p}" for row in ILLCOND_ROWS for p in PRECISIONS]
  return {key: by_row[key] for key in sorted(by_row, key=lambda k: order.index(k) if k in order else len(order))}


def merge_example_entry(new: dict | None, old: dict, old_settings: dict, steps: int) -> dict:
  """One optimizer's example runs: the seeds of ``new`` plus those of ``old`` that ``new`` lacks.

  Raises:
    ValueError: ``old`` was run for another number of steps than ``steps``.
  """
  old_steps = old.get("steps", old_settings.get("example_steps"))
  if old_steps != steps:
    raise ValueError(f"cannot merge runs of {old_steps} steps into runs of {steps} steps")
  old_seeds = old.get("seeds", old_settings["seeds"])
  new = new or {"per_seed": [], "seeds": [], "train_time_s": 0.0}
  per_seed = dict(zip(old_seeds, old["per_seed"]))
  per_seed.update(zip(new["seeds"], new["per_seed"]))
  kept_old = len(set(old_seeds) - set(new["seeds"]))
  seconds = (kept_old * old["train_time_s"] + len(new["seeds"]) * new["train_time_s"]) / len(per_seed)
  return {"per_seed": [per_seed[s] for s in sorted(per_seed)], "seeds": sorted(per_seed), "steps": steps,
          "train_time_s": seconds}


def merge_earlier(result: dict, earlier: dict) -> None:
  """Adds an earlier output's illcond problems and the example seeds ``result`` lacks (its own runs win)."""
  settings, old_settings = result["settings"], earlier["settings"]
  if earlier.get("illcond"):
    ours = dict(result.get("illcond", {}))
    if ours and illcond_seeds(settings) != illcond_seeds(old_settings):
      raise ValueError(f"illcond seeds differ: {illcond_seeds(settings)} here, {illcond_seeds(old_settings)} merged")
    result["illcond"] = {problem: _ordered_rows({**earlier["illcond"].get(problem, {}), **ours.get(problem, {})})
                         for problem in [*ours, *(p for p in earlier["illcond"] if p not in ours)]}
    for key in ("illcond_steps", "illcond_lrs", "illcond_rows"):
      if ours and settings.get(key) != old_settings.get(key):
        raise ValueError(f"{key} differs: {settings.get(key)} here, {old_settings.get(key)} merged")
      settings[key] = old_settings.get(key)
    settings["illcond_seeds"] = illcond_seeds(old_settings)
    settings["problems"] = list(result["illcond"])
  if earlier.get("examples"):
    steps = settings.setdefault("example_steps", old_settings["example_steps"])
    examples = result.setdefault("examples", {})
    for example, by_name in earlier["examples"].items():
      mine = examples.setdefault(example, {})
      for name, old in by_name.items():
        mine[name] = merge_example_entry(mine.get(name), old, old_settings, steps)
    order = {e: example_names(e)[0] for e in quality.EXAMPLES}  # the examples' and optimizers' order
    result["examples"] = {e: dict(sorted(examples[e].items(), key=lambda item, e=e: order[e].index(item[0])))
                          for e in quality.EXAMPLES if e in examples}
    settings["examples"] = list(result["examples"])
    settings.setdefault("soap_lr", SOAP_LR)


def rows(result: dict) -> list[dict]:
  """The table's rows: per (part, task, method, precision) the mean, spread and ratio to ``"highest"``."""
  table = []
  for example, by_name in result.get("examples", {}).items():
    for name, entry in by_name.items():
      finals = np.asarray(entry["per_seed"], np.float64)
      stem = name.removesuffix(SUFFIXES["high"]).removesuffix(SUFFIXES["default"])
      precision = next(p for p in PRECISIONS if name == stem + SUFFIXES[p])
      table.append({"part": "examples", "task": example, "method": stem, "precision": precision,
                    "mean": float(finals.mean()), "spread": float(finals.max() - finals.min()),
                    "metric": "final train loss", "seeds": len(finals)})
  for problem, by_row in result.get("illcond", {}).items():
    for key, summary in by_row.items():
      method, precision = key.split("@")
      table.append({"part": "illcond", "task": problem, "method": method, "precision": precision,
                    "mean": summary["best_mean"], "spread": summary["best_std"], "metric": "best-lr mean",
                    "best_lr": summary["best_lr"], "seeds": len(illcond_seeds(result["settings"]))})
  reference = {(r["task"], r["method"]): r["mean"] for r in table if r["precision"] == "highest"}
  for r in table:
    ref = reference.get((r["task"], r["method"]))
    r["ratio"] = r["mean"] / ref if ref else float("nan")
  return table


def print_table(table: list[dict]) -> None:
  print(f"\n{'task':<18} {'method':<16} {'precision':<9} {'seeds':>5} {'mean':>11} {'spread':>10} {'/highest':>9}")
  for r in table:
    print(f"{r['task']:<18} {r['method']:<16} {r['precision']:<9} {r['seeds']:>5} {r['mean']:>11.5g} "
          f"{r['spread']:>10.3g} {r['ratio']:>9.4f}")
  worst = {p: max((abs(r["ratio"] - 1) for r in table if r["precision"] == p), default=float("nan"))
           for p in PRECISIONS[1:]}
  print("largest |ratio - 1|: " + ", ".join(f"{p} {100 * w:.2f} %" for p, w in worst.items()))


def _family(method: str) -> str:
  return "4-bit SOAP" if method.startswith("soap4") else "4-bit Shampoo"


def _change(row: dict | None) -> str:
  """A row's mean relative to ``"highest"``, in percent."""
  if row is None or row["ratio"] is None or not np.isfinite(row["ratio"]):
    return "—"
  return f"{round(100 * (row['ratio'] - 1), 1) + 0.0:+.1f} %"  # + 0.0: no "-0.0"


def _relative_spread(row: dict | None) -> str:
  """A row's seed spread relative to its mean, in percent."""
  if row is None or not row["mean"]:
    return "—"
  return f"{100 * row['spread'] / row['mean']:.1f} %"


def readme_table(table: list[dict]) -> str:
  """The README's summary of :func:`rows`: per task and method, each precision's mean relative to
  ``"highest"``, and the seed spread at ``"highest"`` relative to its mean."""
  cells, tasks = {}, {}
  for r in table:
    tasks.setdefault(r["task"], r)
    cells[(r["task"], _family(r["method"]), r["precision"])] = r
  families = ("4-bit Shampoo", "4-bit SOAP")
  header = ["task (metric, seeds)"] + [f"{f} {label}" for f in families
                                       for label in ("`high`", "`default`", "seed spread")]
  lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
  for task, first in tasks.items():
    metric = "final train loss" if first["part"] == "examples" else "best-lr mean"
    values = []
    for family in families:
      values += [_change(cells.get((task, family, p))) for p in PRECISIONS[1:]]
      values.append(_relative_spread(cells.get((task, family, "highest"))))
    seeds = " / ".join(dict.fromkeys(str(cells[(task, f, "highest")]["seeds"]) for f in families
                                     if (task, f, "highest") in cells))  # Shampoo / SOAP where they differ
    lines.append(f"| `{task}` ({metric}, {seeds}) | " + " | ".join(values) + " |")
  return "\n".join(lines) + "\n"


def write_readme(path: pathlib.Path, table: list[dict]) -> None:
  """Replaces the text between :data:`README_MARKERS` in ``path`` with :func:`readme_table`."""
  text = path.read_text()
  start, end = (text.find(marker) for marker in README_MARKERS)
  if start < 0 or end < start:
    raise ValueError(f"{path} has no block between {README_MARKERS[0]!r} and {README_MARKERS[1]!r}")
  head = text[:start + len(README_MARKERS[0])]
  path.write_text(head + "\n" + readme_table(table) + text[end:])
  print(f"wrote the precision table of {path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--part", choices=["examples", "illcond", "both", "merge"], default="both",
                      help="merge: run nothing, combine the --merge files")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--examples", nargs="+", choices=list(quality.EXAMPLES), default=list(quality.EXAMPLES))
  parser.add_argument("--steps", type=int, default=100, help="steps of every example")
  parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                      help="4-bit Shampoo and/or 4-bit SOAP (illcond: shampoo4 / soap4_4bit)")
  parser.add_argument("--problems", nargs="+", default=["ls_power_1e4", "logreg_wine", "mlp"])
  parser.add_argument("--illcond-steps", type=int, default=300)
  parser.add_argument("--lrs", type=float, nargs="+", default=None, help="illcond's base learning-rate grid")
  parser.add_argument("--runs-dir", type=pathlib.Path, default=ROOT / "examples" / "outputs" / "precision")
  parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / "precision.json")
  parser.add_argument("--table", type=pathlib.Path, default=None, help="print the table of a written file")
  parser.add_argument("--readme", type=pathlib.Path, default=None,
                      help="with --table: also rewrite that file's precision table (README.md)")
  parser.add_argument("--from-runs", action="store_true",
                      help="examples: read the per-run files of --runs-dir instead of training")
  parser.add_argument("--merge", type=pathlib.Path, nargs="+", default=[],
                      help="also take the illcond part of these earlier outputs")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  if args.table is not None:
    result = json.loads(args.table.read_text())
    print_table(rows(result))
    if args.readme is not None:
      write_readme(args.readme, rows(result))
    return result
  start = time.perf_counter()
  result = {"settings": {"seeds": args.seeds, "precisions": list(PRECISIONS), "machine": "CPU (bf16 emulated)"}}
  if args.part in ("examples", "both"):
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    result["settings"].update(examples=args.examples, example_steps=args.steps, soap_lr=SOAP_LR)
    result["examples"] = examples_from_runs(args) if args.from_runs else run_examples(args)
  if args.part in ("illcond", "both"):
    result["settings"].update(problems=args.problems, illcond_steps=args.illcond_steps, illcond_seeds=args.seeds,
                              illcond_lrs=args.lrs, illcond_rows=list(ILLCOND_ROWS))
    result["illcond"] = run_illcond(args)
  for path in args.merge:
    merge_earlier(result, json.loads(path.read_text()))
  ran = not args.from_runs and args.part != "merge"
  result["settings"]["wall_time_s"] = time.perf_counter() - start if ran else None
  result["table"] = rows(result)
  print_table(result["table"])
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(common.json_safe(result), indent=1))
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
