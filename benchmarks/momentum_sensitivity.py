"""How far a tiny perturbation of SGDM's momentum moves the CNN example's final loss, next to 8-bit momentum.

Run:  python benchmarks/momentum_sensitivity.py [--seeds 0 1 2] [--lr 0.1] [--runs ...] [--out FILE.json]
      python benchmarks/momentum_sensitivity.py --ensemble --streams 4   # m8 vs fp32 as distributions

``examples/cnn_digits.py`` trains SGDM (lr 0.1, momentum 0.9) on 4-bit Shampoo's grafted direction (``--base``:
also on 32-bit Shampoo's, or SGDM alone). Its 8-bit-momentum run (``sgdm+shampoo4_m8``, stochastic rounding)
lands far from the float32 one on some seeds, and once diverged. This script separates "8 bits" from "any
perturbation": per seed it trains

* ``fp32``: float32 momentum (``optax.trace``);
* ``fp32 + noise r`` (r = 1e-3, 1e-2): float32 momentum whose stored buffer is multiplied, every step and
  element, by ``1 + r·N(0, 1)`` (tensors of at least 4096 elements, as 8-bit storage) — three noise streams
  for 1e-2;
* ``m8``: the library's 8-bit momentum (``moment_bits=8``) with its rounding stream and ``--streams - 1``
  others (the stochastic-rounding key folded with 1, 2, ...).

``--ensemble`` asks the question a per-seed gap cannot answer when the final loss is chaotic in the momentum:
is 8-bit momentum's *distribution* of final losses that of float32's? Per seed it trains ``fp32``, ``--streams``
runs ``fp32 + noise 1e-6`` (about 8 float32 ulps per value and step: the same float32 optimizer, as if computed
in another order) and ``--streams`` m8 rounding streams, and reports the gap of the seed-averaged mean final
losses with its standard error (from the within-seed spreads; the seed's effect is shared by both arms).

``--lr`` sets SGDM's peak learning rate (the example's 0.1 spikes the loss above its initial value near the end
of the warm-up; at 0.03 no minibatch loss exceeds the first), ``--runs`` a subset of the runs.

For scale: 8-bit rounding errs by up to 3 % per value (the bound ``tests/test_moments.py`` checks), so
``noise 1e-2`` is a comparable perturbation and ``noise 1e-3`` a much smaller one. It prints per run the final
training loss (mean minibatch loss over the last 30 steps, as the examples) and the largest minibatch loss, and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import cnn_digits  # noqa: E402
import common  # noqa: E402

from optax_shampoo4 import moment_storage, moments  # noqa: E402

DIVERGED = 5.0  # a minibatch loss above this (the loss starts at 2.3) counts as a blow-up
ULP_NOISE = 1e-6  # ~8 float32 ulps: "the same fp32 optimizer, computed in another order"
ULP_FAMILY = "fp32 + noise 1e-6"


def run_list(streams: int) -> list[tuple[str, object, int]]:
  """``(name, kind, stream)``: kind None (fp32), a relative noise level, or "m8"."""
  return ([("fp32", None, 0), ("fp32 + noise 1e-3", 1e-3, 0)]
          + [(f"fp32 + noise 1e-2 #{k}", 1e-2, k) for k in range(3)]
          + [(f"{ULP_FAMILY} #{k}", ULP_NOISE, k) for k in range(streams)]
          + [(f"m8 #{k}", "m8", k) for k in range(streams)])


def family(name: str) -> str:
  """The run's family: its name without the stream number."""
  return name.split(" #")[0]


def noisy_trace(decay: float, relative: float, stream: int) -> optax.GradientTransformation:
  """``optax.trace`` whose stored buffer gets multiplicative Gaussian noise every step (a perturbation control)."""

  def init(params):
    return (jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    del params
    count, buffers = state
    new = jax.tree.map(lambda g, b: g + decay * b, updates, buffers)
    leaves, treedef = jax.tree.flatten(new)
    keys = jax.random.split(jax.random.fold_in(jax.random.key(1000 + stream), count), len(leaves))
    stored = [x * (1 + relative * jax.random.normal(k, x.shape)) if x.size >= moment_storage.MIN_QUANTIZED_SIZE else x
              for x, k in zip(leaves, keys)]
    return new, (count + 1, treedef.unflatten(stored))

  return optax.GradientTransformation(init, update)


BASES = ("sgdm+shampoo4", "sgdm+shampoo32", "sgdm")  # the example's optimizers this script can perturb


def make_optimizer(kind, stream: int, steps: int, lr: float = 0.1,
                   base: str = "sgdm+shampoo4") -> optax.GradientTransformation:
  """``base`` (a variant name of ``examples/variants.py``, built by ``common.make_optimizer``) at peak ``lr``
  with fp32, noisy fp32 or 8-bit momentum."""
  schedule = common.learning_rate_schedule(lr, steps)

  def build(name):
    if name == "sgdm":  # optax.sgd's chain, with the momentum from moments.trace (patched for the noise runs)
      return optax.chain(optax.add_decayed_weights(5e-4), moments.trace(0.9, bits=None),
                         optax.scale_by_learning_rate(schedule))
    return common.make_optimizer(name, schedule, 5e-4, momentum=0.9)

  if kind is None:
    return build(base)
  if kind == "m8":
    # Another rounding stream: the key function is read when the step is traced, so main() restores it
    # after training.
    if stream:
      original = moment_storage.rounding_key
      moment_storage.rounding_key = lambda count, bits, kind_: jax.random.fold_in(original(count, bits, kind_), stream)
    return common.make_optimizer(f"{base}_m8", schedule, 5e-4, momentum=0.9)
  trace = moments.trace  # the aliases build their momentum with moments.trace
  moments.trace = lambda decay, nesterov=False, bits=None: noisy_trace(decay, kind, stream)
  try:
    return build(base)
  finally:
    moments.trace = trace


def ensemble_summary(results: dict, seeds: list[int]) -> dict:
  """m8 against fp32 as distributions over the streams of each seed (see ``--ensemble``).

  Reference runs of a seed: ``fp32`` and its ``fp32 + noise 1e-6`` streams; candidate runs: the ``m8`` streams.
  Per seed the relative gap of the mean final losses; overall, the gap of the seed-averaged means, with a
  standard error from the within-seed spreads (the seed's own effect cancels: both arms share it).
  """
  per_seed, ref_means, cand_means, variance, diverged = [], [], [], 0.0, {"reference": 0, "m8": 0}
  spreads = []
  for seed in seeds:
    rows = results[str(seed)]
    ref = [r for n, r in rows.items() if n == "fp32" or family(n) == ULP_FAMILY]
    cand = [r for n, r in rows.items() if family(n) == "m8"]
    diverged["reference"] += sum(r["diverged"] for r in ref)
    diverged["m8"] += sum(r["diverged"] for r in cand)
    ref = np.array([r["final_train_loss"] for r in ref if not r["diverged"]])
    cand = np.array([r["final_train_loss"] for r in cand if not r["diverged"]])
    if len(ref) < 2 or len(cand) < 2:
      return {"diverged": diverged, "complete": False}
    ref_means.append(ref.mean())
    cand_means.append(cand.mean())
    per_seed.append(cand.mean() / ref.mean() - 1)
    spreads.append(ref.std(ddof=1) / ref.mean())
    variance += ref.var(ddof=1) / len(ref) + cand.var(ddof=1) / len(cand)
  ref_mean, cand_mean = float(np.mean(ref_means)), float(np.mean(cand_means))
  return {
      "complete": True, "diverged": diverged,
      "reference_mean": ref_mean, "m8_mean": cand_mean,
      "relative_gap": cand_mean / ref_mean - 1,
      "relative_gap_stderr": float(np.sqrt(variance) / len(seeds) / ref_mean),
      "relative_gap_per_seed": per_seed,
      "reference_relative_spread_per_seed": spreads,
  }


def train_runs(args: argparse.Namespace, runs: list) -> dict:
  """``{seed: {run name: row}}`` from training every run of every seed."""
  example = cnn_digits.parse_args([])
  _, x_train, y_train, x_test, y_test = cnn_digits.load_data(example.dataset)
  original_key = moment_storage.rounding_key
  results: dict[str, dict[str, dict]] = {}
  for seed in args.seeds:
    batches = common.minibatch_indices(len(x_train), example.batch_size, example.steps, seed)
    results[str(seed)] = {}
    for name, kind, stream in runs:
      tx = make_optimizer(kind, stream, example.steps, args.lr, args.base)
      model = cnn_digits.CNN(x_train.shape[1], nnx.Rngs(seed))
      try:
        run, _ = common.train(name, model, tx, cnn_digits.cross_entropy, ((x_train[i], y_train[i]) for i in batches),
                              lambda m: cnn_digits.evaluate(m, x_test, y_test), steps=example.steps,
                              eval_every=example.steps)
      finally:
        moment_storage.rounding_key = original_key
      losses = np.asarray(run["train_losses"], np.float64)
      finite = bool(np.all(np.isfinite(losses)))
      blowups = np.nonzero(~np.isfinite(losses) | (losses > DIVERGED))[0]
      # Diverged: a non-finite loss, or a final loss still above the blow-up level (did not recover).
      diverged = not finite or run["final_train_loss"] > DIVERGED
      results[str(seed)][name] = {
          "final_train_loss": None if diverged else run["final_train_loss"],
          "max_minibatch_loss": float(np.nanmax(losses)) if finite else None,
          "first_blowup_step": int(blowups[0]) + 1 if blowups.size else None,
          "diverged": diverged,
      }
      row = results[str(seed)][name]
      final = "diverged" if row["diverged"] else f"{row['final_train_loss']:.4f}"
      print(f"seed {seed}  {name:22s} final {final:>9s}  first loss > {DIVERGED:g} at step "
            f"{row['first_blowup_step']}", flush=True)

  return results


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--out", type=pathlib.Path, default=None,
                      help="default: benchmarks/results/momentum_sensitivity[_ensemble][_lr<LR>].json (the "
                           "suffixes with --ensemble and for an lr other than 0.1)")
  parser.add_argument("--lr", type=float, default=0.1,
                      help="SGDM's peak learning rate (the example's 0.1 spikes the loss near the end of its "
                           "warm-up; 0.03 trains without spikes)")
  parser.add_argument("--base", default=BASES[0], choices=BASES,
                      help="the optimizer whose momentum is perturbed (the example's SGDM + 4-bit Shampoo, "
                           "SGDM + 32-bit Shampoo, or SGDM alone)")
  parser.add_argument("--streams", type=int, default=3,
                      help="rounding streams of m8 and noise streams of 'fp32 + noise 1e-6' per seed")
  parser.add_argument("--runs", nargs="+", default=None, metavar="RUN",
                      help="a subset of the runs, by name or family (e.g. 'm8' for every m8 stream; fp32 is "
                           "always run: the gaps are relative to it); default: all but the 1e-6 streams")
  parser.add_argument("--ensemble", action="store_true",
                      help="compare m8 with fp32 as distributions: per seed, fp32 and its 1e-6 noise streams "
                           "against the m8 streams (runs: fp32, 'fp32 + noise 1e-6', m8)")
  parser.add_argument("--from-json", type=pathlib.Path, default=None,
                      help="re-summarize the runs of an earlier output instead of training (written to --out, "
                           "default: the same file)")
  args = parser.parse_args(argv)
  if args.out is None and args.from_json is not None:
    args.out = args.from_json
  if args.out is None:
    suffix = (("_ensemble" if args.ensemble else "") + ("" if args.lr == 0.1 else f"_lr{args.lr:g}")
              + ("" if args.base == BASES[0] else "_" + args.base.replace("+", "_")))
    args.out = ROOT / "benchmarks" / "results" / f"momentum_sensitivity{suffix}.json"
  all_runs = run_list(args.streams)
  if args.ensemble:
    args.runs = (args.runs or []) + [ULP_FAMILY, "m8"]
  elif args.runs is None:
    args.runs = [name for name, kind, _ in all_runs if kind != ULP_NOISE]
  unknown = set(args.runs) - {name for name, _, _ in all_runs} - {family(name) for name, _, _ in all_runs}
  if unknown:
    parser.error(f"unknown --runs {sorted(unknown)}")
  runs = [run for run in all_runs if run[0] == "fp32" or run[0] in args.runs or family(run[0]) in args.runs]
  start = time.perf_counter()
  if args.from_json is not None:  # re-summarize saved runs
    saved = json.loads(args.from_json.read_text())
    results, args.seeds = saved["runs"], saved["seeds"]
    for rows in results.values():
      for row in rows.values():  # files written before a final loss above DIVERGED counted as diverged
        if not row["diverged"] and row["final_train_loss"] > DIVERGED:
          row.update(final_train_loss=None, diverged=True)
    runs = [(name, None, 0) for name in next(iter(results.values()))]
    args.lr, args.base, args.streams = saved.get("lr", args.lr), saved.get("base", args.base), saved.get("streams")
    wall_time = saved.get("wall_time_s")
  else:
    results = train_runs(args, runs)
    wall_time = time.perf_counter() - start

  summary = {}
  print(f"\n{'run':22s} | " + " | ".join(f"seed {s} vs fp32" for s in args.seeds) + " | diverged")
  for name, _, _ in runs:
    gaps, diverged = [], 0
    for seed in args.seeds:
      row, base = results[str(seed)][name], results[str(seed)]["fp32"]["final_train_loss"]
      diverged += row["diverged"]
      gaps.append(None if row["diverged"] or base is None else row["final_train_loss"] / base - 1)
    summary[name] = {"relative_gap_per_seed": gaps, "diverged_seeds": diverged}
    print(f"{name:22s} | " + " | ".join("   diverged  " if g is None else f"{g:+12.1%}" for g in gaps)
          + f" | {diverged}")
  ensemble = None
  if args.ensemble:
    ensemble = ensemble_summary(results, args.seeds)
    if ensemble["complete"]:
      print(f"\nensemble: m8 vs fp32 (+ {ULP_FAMILY} streams), diverged runs left out; seed-averaged mean final loss: "
            f"{ensemble['relative_gap']:+.2%} ± {ensemble['relative_gap_stderr']:.2%} (standard error); per seed "
            + " / ".join(f"{g:+.1%}" for g in ensemble["relative_gap_per_seed"])
            + "; fp32 spread per seed " + " / ".join(f"{v:.1%}" for v in ensemble["reference_relative_spread_per_seed"])
            + f"; diverged runs {ensemble['diverged']}")
    else:
      print(f"\nensemble incomplete: diverged runs {ensemble['diverged']}")
  args.out.write_text(json.dumps({
      "example": f"cnn_digits, {args.base} (examples/common.py), peak lr {args.lr:g}, momentum 0.9, T1=10, "
                 f"T2=20, 300 steps",
      "base": args.base, "lr": args.lr,
      "final_train_loss": "mean minibatch loss over the last 30 steps",
      "seeds": args.seeds, "streams": args.streams, "runs": results, "summary": summary, "ensemble": ensemble,
      "backend": jax.default_backend(),
      "wall_time_s": wall_time}, indent=1))
  print(f"wrote {args.out}")
  return results


if __name__ == "__main__":
  main()
