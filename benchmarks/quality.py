"""Training quality: the three examples, every optimizer, several seeds.

Runs ``examples/cnn_digits.py`` (SGDM family), ``examples/transformer_lm.py``
and ``examples/autoencoder_mnist.py`` (AdamW family) through their ``main``
functions for each seed, then prints one table (example x optimizer: final
training loss mean ± spread over seeds, held-out metric) and checks three
targets on the final training loss (the quantity every optimizer minimizes;
held-out numbers are reported alongside), for the variants present:

* **4-bit ≈ 32-bit**: 4-bit Shampoo (``+shampoo4``, library defaults) at most 2% above 32-bit Shampoo;
* **8-bit ≈ 32-bit**: 8-bit eigenvectors (``+shampoo8``) at most 1% above 32-bit Shampoo;
* **4-bit vs first-order**: 4-bit Shampoo below the first-order baseline at equal steps;
* **ours vs naive**: 4-bit Shampoo (quantized eigenvectors) below naive 4-bit
  (quantized statistic and root);
* the paper's refresh (``+shampoo4_qr``, one warm-started QR step) is reported against 32-bit.

``--variants`` picks the Shampoo variants (default: shampoo32 naive4 shampoo4);
``--reuse-from`` takes the first-order, 32-bit and naive runs of matching settings from an earlier
JSON instead of training them again.
* **8-bit moments**: for every optimizer run also with 8-bit moments (name
  suffix ``_m8``, e.g. ``--extra --optimizers adamw+shampoo4 adamw+shampoo4_m8
  adamw+shampoo4_m4``), final loss within 1% of its float32-moment version
  (the ``_m4`` gaps are reported too). Targets whose optimizers were not run are skipped.

Writes ``benchmarks/results/quality.json`` (settings, per-run numbers, the
summary and the targets) and ``benchmarks/results/quality.png`` (training loss
relative to the first-order baseline, and held-out loss, over the run). The per-run JSON/PNG files of the examples go to
``examples/outputs/quality/`` (git-ignored). With the examples' default
steps this takes roughly 3 x 3 minutes per seed on two idle CPU cores:

  python benchmarks/quality.py                       # seeds 0 1, default steps
  python benchmarks/quality.py --seeds 0 1 2 --steps 600
  python benchmarks/quality.py --examples cnn_digits --seeds 0
  python benchmarks/quality.py --from-runs           # re-summarize the last runs, no training

``--soap`` runs the SOAP comparison instead (``quality_soap.json`` / ``.png``,
per-run files in ``examples/outputs/quality_soap/``): per example AdamW,
the example's 4-bit Shampoo, and SOAP with a float32 and a 4-bit eigenbasis
(:data:`SOAP_RUNS`), with the targets 4-bit SOAP within 3% of float32 SOAP,
and ahead of AdamW and of 4-bit Shampoo. SOAP replaces the base optimizer, so
the SGDM example gets an AdamW row at SOAP's learning rate as its first-order
reference next to its own SGDM and SGDM + 4-bit Shampoo rows.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import common  # noqa: E402  (examples/common.py)
import variants  # noqa: E402  (examples/variants.py: the optimizer names)

RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "examples" / "outputs" / "quality"

# example -> its first-order baseline (the optimizer family it runs)
BASES = {"cnn_digits": "sgdm", "transformer_lm": "adamw", "autoencoder_mnist": "adamw"}
# example -> (held-out metric key, its label, higher is better)
EXAMPLES = {
    "cnn_digits": [("loss", "test loss", False), ("accuracy", "test acc", True)],
    "transformer_lm": [("loss", "valid loss", False)],
    "autoencoder_mnist": [("loss", "test BCE", False), ("mse", "test sq. err", False)],
}
RELATIVE_TOLERANCE = 0.02  # "4-bit within 2% of 32-bit"
RELATIVE_TOLERANCE_8BIT = 0.01  # "8-bit within 1% of 32-bit"
# Optimizers whose results do not depend on the eigen format's settings: --reuse-from may take them
# from an earlier quality.json with the same example settings instead of training them again.
REUSABLE = ("", "shampoo32", "naive4")
SOAP_TOLERANCE = 0.03  # "4-bit SOAP within 3% of 32-bit SOAP"
# --soap: example -> (optimizers, peak learning rates given with --lr-for). The transformer keeps
# its AdamW learning rate for every row (3e-3, SOAP's default too); the CNN trains SOAP and AdamW at
# 3e-3 (SGDM keeps 0.1); the autoencoder trains SOAP at 1e-2, the best of 1e-4 ... 1e-2 on seed 0
# (at AdamW's 1e-3 it is stuck near 370; AdamW itself is worse at 1e-2 than at its 1e-3: 155.6 vs 133.4).
SOAP_RUNS = {
    "cnn_digits": (["sgdm", "sgdm+shampoo4", "adamw", "soap32_ref", "soap32", "soap8", "soap4", "soap4_nohead"],
                   ["adamw=3e-3", "soap32_ref=3e-3", "soap32=3e-3", "soap8=3e-3", "soap4=3e-3",
                    "soap4_nohead=3e-3"]),
    "transformer_lm": (["adamw", "adamw+shampoo4", "soap32_ref", "soap32", "soap8", "soap4", "soap4_nohead"], []),
    "autoencoder_mnist": (["adamw", "adamw+shampoo4", "soap32_ref", "soap32", "soap8", "soap4", "soap4_nohead"],
                          ["soap32_ref=1e-2", "soap32=1e-2", "soap8=1e-2", "soap4=1e-2", "soap4_nohead=1e-2"]),
}


def null_to_nan(tree):
  """Inverse of ``common.json_safe`` for the per-run results (their only nulls are diverged losses)."""
  if isinstance(tree, dict):
    return {key: null_to_nan(value) for key, value in tree.items()}
  if isinstance(tree, list):
    return [null_to_nan(value) for value in tree]
  return float("nan") if tree is None else tree


def load_example(name: str):
  spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def roles(optimizers: list[str]) -> dict[str, str]:
  """``{"base": "sgdm", "fp32": "sgdm+shampoo32", "eigen": "sgdm+shampoo4", ...}`` for the optimizers present.

  Roles: ``base`` (first order), ``fp32`` (32-bit Shampoo), ``naive`` (naive 4-bit), ``eigen`` (4-bit,
  library defaults), ``paper`` (4-bit with the paper's refresh, ``+shampoo4_qr``), ``eigen8`` (8-bit).
  """
  base = next(name for name in optimizers if variants.parse(name).family == "first_order")
  wanted = {"base": base, "fp32": f"{base}+shampoo32", "naive": f"{base}+naive4", "eigen": f"{base}+shampoo4",
            "paper": f"{base}+shampoo4_qr", "eigen8": f"{base}+shampoo8"}
  return {role: name for role, name in wanted.items() if name in optimizers}


def summarize(runs: dict[int, dict[str, dict]], metrics) -> dict[str, dict]:
  """Per optimizer: mean / min / max over seeds of the final train loss and each held-out metric."""
  summary = {}
  for name in next(iter(runs.values())):
    finals = np.array([runs[seed][name]["final_train_loss"] for seed in runs])
    entry = {"final_train_loss": {"mean": finals.mean(), "min": finals.min(), "max": finals.max(),
                                  "per_seed": finals.tolist()}}
    for key, _, _ in metrics:
      values = np.array([runs[seed][name]["final_eval"][key] for seed in runs])
      entry[key] = {"mean": values.mean(), "min": values.min(), "max": values.max(), "per_seed": values.tolist()}
    entry["state_bytes"] = runs[next(iter(runs))][name]["state_bytes"]["total"]
    entry["preconditioner_bytes"] = runs[next(iter(runs))][name]["state_bytes"]["preconditioner"]
    entry["train_time_s"] = float(np.mean([runs[seed][name]["train_time_s"] for seed in runs]))
    entry["train_cpu_s"] = float(np.mean([runs[seed][name]["train_cpu_s"] for seed in runs]))
    entry["failures"] = sum(sum(runs[seed][name]["shampoo_counters"].values()) for seed in runs)
    entry["diverged_seeds"] = int(np.sum(~np.isfinite(finals)))  # NaN training loss at the end
    summary[name] = {k: ({kk: float(vv) if not isinstance(vv, list) else vv for kk, vv in v.items()}
                         if isinstance(v, dict) else v) for k, v in entry.items()}
  return summary


def _gap(a: float, b: float) -> float:
  """``(a - b) / b``; NaN where either side diverged."""
  return (a - b) / b if np.isfinite(a) and np.isfinite(b) else float("nan")


def targets(runs: dict[int, dict[str, dict]], summary: dict[str, dict], metrics) -> dict[str, dict]:
  """The targets on the final training loss (means over seeds, and per seed), for the roles present.

  A diverged run (NaN final loss) counts as an infinitely high loss: it is
  behind anything finite.
  """
  role = {r: name for r, name in roles(list(summary)).items() if name in summary}
  per_seed = {r: np.nan_to_num(np.array(summary[name]["final_train_loss"]["per_seed"]), nan=np.inf)
              for r, name in role.items()}
  loss = {r: float(np.mean(values)) for r, values in per_seed.items()}
  key = metrics[0][0]  # the held-out loss, reported next to each target
  held = {r: summary[name][key]["mean"] for r, name in role.items()}
  out = {}

  def within(target, variant, tolerance):
    if variant in loss and "fp32" in loss:
      out[target] = {
          "met": bool(loss[variant] <= (1 + tolerance) * loss["fp32"]),
          "relative_gap": _gap(loss[variant], loss["fp32"]),  # (variant - 32-bit) / 32-bit; negative: lower
          "per_seed_relative_gap": [_gap(a, b) for a, b in zip(per_seed[variant], per_seed["fp32"])],
          "held_out_metric": key, "held_out_variant": held[variant], "held_out_32bit": held["fp32"],
      }

  def ahead(target, variant, other):
    if variant in loss and other in loss:
      out[target] = {
          "met": bool(loss[variant] < loss[other]),
          "relative_gap": _gap(loss[variant], loss[other]),
          "seeds_ahead": int(np.sum(per_seed[variant] < per_seed[other])), "seeds": len(runs),
          "held_out_metric": key, "held_out_ahead": bool(held[variant] < held[other]),
      }

  within("4bit_within_2pct_of_32bit", "eigen", RELATIVE_TOLERANCE)
  within("8bit_within_1pct_of_32bit", "eigen8", RELATIVE_TOLERANCE_8BIT)
  within("paper_4bit_vs_32bit", "paper", RELATIVE_TOLERANCE)
  ahead("4bit_ahead_of_first_order", "eigen", "base")
  ahead("eigen_ahead_of_naive4", "eigen", "naive")
  if "eigen_ahead_of_naive4" in out:
    out["eigen_ahead_of_naive4"]["naive4_diverged_seeds"] = int(np.sum(~np.isfinite(per_seed["naive"])))
  out.update(moment_targets(summary))
  return out


def moment_targets(summary: dict[str, dict]) -> dict[str, dict]:
  """Each optimizer with quantized moments vs the same one with float32 moments: 8-bit within 1%, 4-bit reported."""
  out = {}
  for name in summary:
    variant = variants.parse(name)
    reference_name = variants.with_moment_bits(name, None)
    if variant.moment_bits is None or reference_name not in summary:
      continue
    quantized, reference = (np.nan_to_num(np.array(summary[n]["final_train_loss"]["per_seed"]), nan=np.inf)
                            for n in (name, reference_name))
    eight_bit = variant.moment_bits == 8
    out[f"{name}_vs_fp32_moments"] = {
        "met": bool(not eight_bit or quantized.mean() <= (1 + RELATIVE_TOLERANCE_8BIT) * reference.mean()),
        "target": "within 1%" if eight_bit else "reported only",
        "relative_gap": _gap(quantized.mean(), reference.mean()),
        "per_seed_relative_gap": [_gap(a, b) for a, b in zip(quantized, reference)],
    }
  return out


def soap_targets(runs: dict[int, dict[str, dict]], summary: dict[str, dict], metrics) -> dict[str, dict]:
  """4-bit SOAP vs float32 SOAP (within 3%), vs AdamW and vs the example's 4-bit Shampoo (ahead)."""
  shampoo = next(name for name in summary if name.endswith("+shampoo4"))
  per_seed = {name: np.nan_to_num(np.array(summary[name]["final_train_loss"]["per_seed"]), nan=np.inf)
              for name in ("soap4", "soap32", "soap32_ref", "adamw", shampoo) if name in summary}
  loss = {name: float(np.mean(values)) for name, values in per_seed.items()}
  key = metrics[0][0]
  out = {f"soap4_within_3pct_of_{ref}": {
      "met": bool(loss["soap4"] <= (1 + SOAP_TOLERANCE) * loss[ref]),
      "relative_gap": _gap(loss["soap4"], loss[ref]),
      "per_seed_relative_gap": [_gap(a, b) for a, b in zip(per_seed["soap4"], per_seed[ref])]}
      for ref in ("soap32", "soap32_ref") if ref in per_seed}
  for label, other in (("adamw", "adamw"), ("shampoo4", shampoo)):
    out[f"soap4_ahead_of_{label}"] = {
        "met": bool(loss["soap4"] < loss[other]), "versus": other,
        "relative_gap": _gap(loss["soap4"], loss[other]),
        "seeds_ahead": int(np.sum(per_seed["soap4"] < per_seed[other])), "seeds": len(runs),
        "held_out_metric": key,
        "held_out_ahead": bool(summary["soap4"][key]["mean"] < summary[other][key]["mean"])}
  return out


def pct(gap: float) -> str:
  """A relative gap as a signed percentage; ``n/a`` where a side diverged."""
  return f"{gap:+.2%}" if np.isfinite(gap) else "n/a"


def print_soap_targets(all_targets: dict[str, dict]) -> None:
  for example, t in all_targets.items():
    parts = [f"4-bit vs {label} {pct(a['relative_gap'])} ({'met' if a['met'] else 'NOT met'})"
             for label, a in (("32-bit SOAP", t.get("soap4_within_3pct_of_soap32")),
                              ("reference-semantics SOAP", t.get("soap4_within_3pct_of_soap32_ref"))) if a]
    for label in ("adamw", "shampoo4"):
      b = t[f"soap4_ahead_of_{label}"]
      parts.append(f"vs {b['versus']} {pct(b['relative_gap'])}, {b['seeds_ahead']}/{b['seeds']} seeds "
                   f"({'met' if b['met'] else 'NOT met'})")
    print(f"  {example}: " + "; ".join(parts))


def print_tables(summaries: dict[str, dict], all_targets: dict[str, dict], num_seeds: int) -> None:
  header = ("example", "optimizer", "final train loss", "held-out", "state bytes", "time (s)", "CPU (s)")
  rows = [header]
  for example, summary in summaries.items():
    for name, s in summary.items():
      f = s["final_train_loss"]
      held = ", ".join(
          f"{label} {s[key]['mean']:.2%}" if key == "accuracy" else f"{label} {s[key]['mean']:.4g}"
          for key, label, _ in EXAMPLES[example])
      final = f"{f['mean']:.4f} ± {(f['max'] - f['min']) / 2:.4f}" if not s["diverged_seeds"] else (
          f"diverged in {s['diverged_seeds']}/{num_seeds} seeds")
      rows.append((example, name, final, held,
                   f"{s['state_bytes']:,}", f"{s['train_time_s']:.1f}", f"{s['train_cpu_s']:.1f}"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  for i, row in enumerate(rows):
    print(" | ".join(cell.ljust(w) if j < 2 or j == 3 else cell.rjust(w)
                     for j, (cell, w) in enumerate(zip(row, widths))))
    if i == 0:
      print("-+-".join("-" * w for w in widths))
  print(f"final train loss: mean ± half the range over {num_seeds} seeds (mean minibatch loss over the last "
        f"10% of steps); held-out: means over seeds; time / CPU: training wall / CPU seconds per run.")
  print("\ntargets (final training loss, means over seeds; a diverged run counts as infinitely high):")
  if any("soap4_within_3pct_of_soap32" in t for t in all_targets.values()):
    print_soap_targets(all_targets)
    return
  for example, t in all_targets.items():
    parts = []
    for target, entry in t.items():
      seeds = f", {entry['seeds_ahead']}/{entry['seeds']} seeds" if "seeds_ahead" in entry else ""
      verdict = ("" if target.startswith("paper") or entry.get("target") == "reported only"
                 else f" ({'met' if entry['met'] else 'NOT met'})")
      parts.append(f"{target} {pct(entry['relative_gap'])}{seeds}{verdict}")
    print(f"  {example}: " + "; ".join(parts))


def plot(path: pathlib.Path, runs: dict[str, dict[int, dict]], settings: dict) -> None:
  """Row 1: training loss relative to the first-order baseline; row 2: held-out loss. Mean over seeds, min-max band."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  examples = list(runs)
  fig, axes = plt.subplots(2, len(examples), figsize=(5 * len(examples), 7.5), squeeze=False)
  for col, example in enumerate(examples):
    by_seed = runs[example]
    names = list(next(iter(by_seed.values())))
    base = roles(names)["base"]
    length = len(by_seed[next(iter(by_seed))][base]["train_losses"])
    window = max(1, length // 30)

    def smooth(losses, window=window):
      return np.convolve(losses, np.ones(window) / window, mode="valid")

    steps = np.arange(window, length + 1)
    for name in names:
      ratio = np.array([smooth(by_seed[s][name]["train_losses"]) / smooth(by_seed[s][base]["train_losses"])
                        for s in by_seed])
      line, = axes[0, col].plot(steps, ratio.mean(0), label=name)
      axes[0, col].fill_between(steps, ratio.min(0), ratio.max(0), color=line.get_color(), alpha=0.12)
      eval_steps = by_seed[next(iter(by_seed))][name]["eval_steps"]
      held = np.array([by_seed[s][name]["eval"]["loss"] for s in by_seed])
      axes[1, col].plot(eval_steps, held.mean(0), marker="o", markersize=3, color=line.get_color(), label=name)
      axes[1, col].fill_between(eval_steps, held.min(0), held.max(0), color=line.get_color(), alpha=0.12)
    # Limits from the runs that did not diverge (a diverged run's curve leaves the plot).
    ratio_values = np.concatenate([line.get_ydata() for line in axes[0, col].get_lines()])
    ratio_values = ratio_values[np.isfinite(ratio_values) & (ratio_values < 2.0)]
    if ratio_values.size:
      lo, hi = ratio_values.min(), ratio_values.max()
      axes[0, col].set_ylim(lo - 0.1 * (hi - lo) - 1e-3, hi + 0.1 * (hi - lo) + 1e-3)
    held_values = np.concatenate([line.get_ydata() for line in axes[1, col].get_lines()])
    held_values = held_values[np.isfinite(held_values)]
    if held_values.size:
      first = [line.get_ydata()[0] for line in axes[1, col].get_lines() if np.isfinite(line.get_ydata()[0])]
      axes[1, col].set_ylim(held_values.min() * 0.97, float(np.median(first)) * 1.1)
    axes[0, col].set(title=f"{example} ({settings['steps'][example]} steps)", xlabel="step",
                     ylabel=f"training loss / {base}'s (moving avg. of {window})")
    axes[1, col].set(xlabel="step", ylabel="held-out loss", yscale="log")
    axes[1, col].legend(fontsize=8)
    for ax in axes[:, col]:
      ax.grid(alpha=0.3, which="both")
  fig.suptitle(f"mean over seeds {settings['seeds']} (bands: min-max over seeds)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The flags, with the defaults that depend on ``--soap`` filled in and ``--variants`` checked."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  parser.add_argument("--steps", type=int, default=None, help="steps for every example (default: each example's own)")
  parser.add_argument("--examples", nargs="+", choices=list(EXAMPLES), default=list(EXAMPLES))
  parser.add_argument("--variants", nargs="+", default=list(variants.DEFAULT_SHAMPOO),
                      help="Shampoo variants next to each example's first-order baseline, as suffixes of "
                           "examples/variants.py's names (e.g. shampoo32 shampoo4 shampoo4_qr shampoo8 shampoo4_m8)")
  parser.add_argument("--reuse-from", type=pathlib.Path, default=None,
                      help="an earlier quality.json: take the first-order, shampoo32 and naive4 runs of the "
                           "same seeds from it when its example settings match (they do not depend on the "
                           "eigen format's code) instead of training them again")
  parser.add_argument("--reuse-all", action="store_true",
                      help="with --reuse-from: reuse every optimizer it holds (only when the library code is "
                           "unchanged since it was written)")
  parser.add_argument("--retrain", nargs="+", default=[],
                      help="with --reuse-from: optimizers trained again even where a run could be reused "
                           "(e.g. --reuse-all --retrain soap4 soap8 after a change to the quantized SOAP)")
  parser.add_argument("--out-name", default="quality", help="the results are <out-dir>/<out-name>.json/.png")
  parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                      help="further flags passed to every example (e.g. --extra --epsilon 1e-6)")
  parser.add_argument("--out-dir", type=pathlib.Path, default=RESULTS)
  parser.add_argument("--runs-dir", type=pathlib.Path, default=None,
                      help="where the per-run JSON/PNG files go (default: examples/outputs/quality[_soap])")
  parser.add_argument("--soap", action="store_true", help="the SOAP comparison (see the module doc)")
  parser.add_argument("--from-runs", action="store_true",
                      help="no training: rebuild the table, JSON and PNG from the per-run files in --runs-dir")
  args = parser.parse_args(argv)
  for name in [f"{BASES[example]}+{variant}" for example in args.examples for variant in args.variants]:
    try:
      variants.parse(name)
    except ValueError as error:
      parser.error(f"--variants: {error}")
  if args.runs_dir is None:
    args.runs_dir = RUNS.parent / "quality_soap" if args.soap else RUNS
  if args.soap and args.out_name == "quality":
    args.out_name = "quality_soap"
  return args


# ----------------------------------------------------------------------------- collecting the runs


def example_optimizers(example: str, args: argparse.Namespace) -> tuple[list[str], list[str]]:
  """``(optimizer names, --lr-for flags)`` that ``example`` runs."""
  if args.soap:
    names, learning_rates = SOAP_RUNS[example]
    return list(names), (["--lr-for", *learning_rates] if learning_rates else [])
  return list(variants.optimizer_names(BASES[example], args.variants)), []


def _learning_rates(lr_for: list[str]) -> dict[str, str]:
  """``["soap4=3e-3", ...]`` -> ``{"soap4": "3e-3", ...}``."""
  return dict(entry.partition("=")[::2] for entry in lr_for)


def _registry_runs(held: dict[str, dict]) -> dict[str, dict]:
  """An earlier file's runs by registry name: legacy spellings translated, names no longer registered left out."""
  runs = {}
  for name, run in held.items():
    with contextlib.suppress(ValueError):
      runs[variants.canonical(name)] = run
  return runs


def reusable_runs(previous: dict | None, example: str, seed: int, names: list[str], lr_flags: list[str],
                  args: argparse.Namespace) -> dict[str, dict]:
  """The runs of ``names`` that ``previous`` (an earlier quality.json) holds and that may be reused.

  Only the optimizers of :data:`REUSABLE` unless ``--reuse-all`` (the earlier file was written by the same
  code, e.g. a second pass adding rows to a first); never one that ``--retrain`` names, nor one that either
  side's ``--lr-for`` gives a different learning rate.
  """
  if previous is None:
    return {}
  held = _registry_runs(previous.get("runs", {}).get(example, {}).get(str(seed), {}))
  allowed = {f"{BASES[example]}+{variant}" if variant else BASES[example] for variant in REUSABLE}
  earlier = _learning_rates(previous["settings"]["example_configs"].get(example, {}).get("lr_for", []))
  now = _learning_rates(lr_flags[1:])
  return {name: null_to_nan(held[name]) for name in names
          if name in held and (args.reuse_all or name in allowed) and name not in args.retrain
          and earlier.get(name) == now.get(name)}


def _same_settings(a: dict, b: dict) -> bool:
  """Example settings equal up to the optimizer list, seed, output path and per-optimizer learning rates.

  (A run is never reused for an optimizer that either side's ``--lr-for`` names, see :func:`reusable_runs`.)
  """
  ignore = {"optimizers", "seed", "out", "lr_for"}
  return {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}


def run_seed(module, example: str, seed: int, names: list[str], lr_flags: list[str], previous: dict | None,
             args: argparse.Namespace) -> tuple[dict[str, dict], dict, list[str]]:
  """Trains (or reuses) every optimizer of ``example`` on one seed: ``(runs, example config, reused names)``."""
  out = args.runs_dir / f"{example}_seed{seed}.json"
  old = reusable_runs(previous, example, seed, names, lr_flags, args)
  to_train = [name for name in names if name not in old]
  argv = ["--seed", str(seed), "--out", str(out), "--optimizers", *to_train] + (
      ["--steps", str(args.steps)] if args.steps else []) + lr_flags + args.extra
  print(f"\n=== {example} seed {seed}: {' '.join(argv)}" + (f" (reusing {', '.join(old)})" if old else ""),
        flush=True)
  if to_train:
    trained = module.main(argv)
    config = json.loads(out.read_text())["config"]
  else:  # everything reused: the earlier run's settings (same by construction)
    trained, config = {}, dict(previous["settings"]["example_configs"][example])
  if old and not _same_settings(previous["settings"]["example_configs"][example], config):
    raise SystemExit(f"--reuse-from: {example}'s settings differ from the earlier run's; run without it")
  return {name: old[name] if name in old else trained[name] for name in names}, config, list(old)


def collect(args: argparse.Namespace) -> tuple[dict, dict, list[str]]:
  """``(runs {example: {seed: {optimizer: results}}}, example configs, reused runs)``: trained, reused from
  ``--reuse-from`` or, with ``--from-runs``, read back from the per-run files."""
  runs, configs, reused = {}, {}, []
  previous = json.loads(args.reuse_from.read_text()) if args.reuse_from else None
  for example in args.examples:
    names, lr_flags = example_optimizers(example, args)
    module = None if args.from_runs else load_example(example)
    runs[example] = {}
    for seed in args.seeds:
      if args.from_runs:
        written = json.loads((args.runs_dir / f"{example}_seed{seed}.json").read_text())
        runs[example][seed], configs[example] = null_to_nan(written["results"]), written["config"]
        continue
      runs[example][seed], config, old = run_seed(module, example, seed, names, lr_flags, previous, args)
      configs[example] = dict(config, optimizers=names)
      reused += [f"{example}/{seed}/{name}" for name in old]
  return runs, configs, reused


# ----------------------------------------------------------------------------- reporting


def run_settings(args: argparse.Namespace, runs: dict, configs: dict, reused: list[str],
                 wall_time_s: float | None) -> dict:
  """The ``settings`` entry of the JSON: seeds, steps, each example's flags, the machine, reuse."""
  import jax

  return {
      "seeds": args.seeds, "steps": {example: config["steps"] for example, config in configs.items()},
      "steps_note": "each example's default steps" if args.steps is None else f"--steps {args.steps} for all",
      "extra_flags": args.extra,
      "example_configs": {e: {k: v for k, v in c.items() if k not in ("seed", "out")} for e, c in configs.items()},
      "final_train_loss": "mean minibatch loss over the last 10% of steps, same minibatches for every optimizer",
      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, this process pinned to "
                 f"{len(os.sched_getaffinity(0))}; jax backend {jax.default_backend()}",
      "total_wall_time_s": wall_time_s,
      "sum_train_time_s": sum(r["train_time_s"] for by_seed in runs.values() for by_opt in by_seed.values()
                              for r in by_opt.values()),
      "rebuilt_from_runs": args.from_runs,
      "reused_runs": {"from": str(args.reuse_from.name) if args.reuse_from else None, "runs": reused},
  }


def report(args: argparse.Namespace, runs: dict, settings: dict) -> dict:
  """Summaries and targets per example; prints the tables, writes the JSON and the PNG; returns the JSON's dict."""
  summaries = {example: summarize(by_seed, EXAMPLES[example]) for example, by_seed in runs.items()}
  check = soap_targets if args.soap else targets
  all_targets = {example: check(runs[example], summaries[example], EXAMPLES[example]) for example in runs}
  print()
  print_tables(summaries, all_targets, len(args.seeds))
  args.out_dir.mkdir(parents=True, exist_ok=True)
  result = {"settings": settings, "summary": summaries, "targets": all_targets,
            "runs": {e: {str(s): dict(by_opt) for s, by_opt in by_seed.items()} for e, by_seed in runs.items()}}
  json_path, png_path = args.out_dir / f"{args.out_name}.json", args.out_dir / f"{args.out_name}.png"
  json_path.write_text(json.dumps(common.json_safe(result), indent=1))
  plot(png_path, runs, settings)
  wall = settings["total_wall_time_s"]
  print(f"\nwrote {json_path} and {png_path}" + ("" if wall is None else f" ({wall / 60:.1f} min)"))
  return result


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  start = time.perf_counter()
  runs, configs, reused = collect(args)
  wall_time_s = None if args.from_runs else time.perf_counter() - start
  return report(args, runs, run_settings(args, runs, configs, reused, wall_time_s))


if __name__ == "__main__":
  main()
