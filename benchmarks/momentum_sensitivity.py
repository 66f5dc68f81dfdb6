"""How far a tiny perturbation of SGDM's momentum moves the CNN example's final loss, next to 8-bit momentum.

Run:  python benchmarks/momentum_sensitivity.py [--seeds 0 1 2] [--lr 0.1] [--runs ...] [--out FILE.json]

``examples/cnn_digits.py`` trains SGDM (lr 0.1, momentum 0.9) on 4-bit Shampoo's grafted direction. Its
8-bit-momentum run (``sgdm+shampoo4_m8``, stochastic rounding) diverged on seed 0 in ``quality_variants``.
This script separates "8 bits" from "any perturbation": per seed it trains

* ``fp32``: float32 momentum (``optax.trace``);
* ``fp32 + noise r`` (r = 1e-3, 1e-2): float32 momentum whose stored buffer is multiplied, every step and
  element, by ``1 + r·N(0, 1)`` (tensors of at least 4096 elements, as 8-bit storage) — three noise streams
  for 1e-2;
* ``m8``: the library's 8-bit momentum (``moment_bits=8``) with its rounding stream and two others (the
  stochastic-rounding key folded with 1 and 2).

``--lr`` sets SGDM's peak learning rate (the example's 0.1 spikes the loss above its initial value near the end
of the warm-up; at 0.03 no minibatch loss exceeds the first), ``--runs`` a subset of the runs.

For scale: 8-bit rounding errs by up to 3 % per value (the bound ``tests/test_moments.py`` checks), so
``noise 1e-2`` is a comparable perturbation and ``noise 1e-3`` a much smaller one. It prints per run the final training loss (mean minibatch loss over the last 30 steps, as the
examples) and the largest minibatch loss, and writes JSON.
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

import optax_shampoo4 as s4  # noqa: E402
from optax_shampoo4 import moments  # noqa: E402

DIVERGED = 5.0  # a minibatch loss above this (the loss starts at 2.3) counts as a blow-up
RUNS = [("fp32", None, 0), ("fp32 + noise 1e-3", 1e-3, 0)] + [
    (f"fp32 + noise 1e-2 #{k}", 1e-2, k) for k in range(3)] + [(f"m8 #{k}", "m8", k) for k in range(3)]


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
    stored = [x * (1 + relative * jax.random.normal(k, x.shape)) if x.size >= moments.MIN_QUANTIZED_SIZE else x
              for x, k in zip(leaves, keys)]
    return new, (count + 1, treedef.unflatten(stored))

  return optax.GradientTransformation(init, update)


def make_optimizer(kind, stream: int, steps: int, lr: float = 0.1) -> optax.GradientTransformation:
  schedule = common.learning_rate_schedule(lr, steps)
  shampoo = dict(stats_every=common.STATS_EVERY, root_every=common.ROOT_EVERY, epsilon=common.EPSILON,
                 min_quant_order=common.MIN_QUANT_ORDER)
  if kind is None:
    return s4.sgdm_shampoo4(schedule, momentum=0.9, weight_decay=5e-4, **shampoo)
  if kind == "m8":
    # Another rounding stream: the key function is read when the step is traced, so main() restores it
    # after training.
    if stream:
      original = moments.rounding_key
      moments.rounding_key = lambda count, bits, kind_: jax.random.fold_in(original(count, bits, kind_), stream)
    return s4.sgdm_shampoo4(schedule, momentum=0.9, weight_decay=5e-4, moment_bits=8, **shampoo)
  trace = moments.trace  # sgdm_shampoo4 builds its momentum with moments.trace
  moments.trace = lambda decay, nesterov=False, bits=None: noisy_trace(decay, kind, stream)
  try:
    return s4.sgdm_shampoo4(schedule, momentum=0.9, weight_decay=5e-4, **shampoo)
  finally:
    moments.trace = trace


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--out", type=pathlib.Path, default=None,
                      help="default: benchmarks/results/momentum_sensitivity.json (lr 0.1), else "
                           "momentum_sensitivity_lr<LR>.json")
  parser.add_argument("--lr", type=float, default=0.1,
                      help="SGDM's peak learning rate (the example's 0.1 spikes the loss near the end of its "
                           "warm-up; 0.03 trains without spikes)")
  parser.add_argument("--runs", nargs="+", default=[name for name, _, _ in RUNS], choices=[name for name, _, _ in RUNS],
                      metavar="RUN", help="a subset of the runs (fp32 is always run: the gaps are relative to it)")
  args = parser.parse_args(argv)
  if args.out is None:
    suffix = "" if args.lr == 0.1 else f"_lr{args.lr:g}"
    args.out = ROOT / "benchmarks" / "results" / f"momentum_sensitivity{suffix}.json"
  runs = [run for run in RUNS if run[0] == "fp32" or run[0] in args.runs]
  example = cnn_digits.parse_args([])
  _, x_train, y_train, x_test, y_test = cnn_digits.load_data(example.dataset)
  original_key = moments.rounding_key
  results: dict[str, dict[str, dict]] = {}
  start = time.perf_counter()
  for seed in args.seeds:
    batches = common.minibatch_indices(len(x_train), example.batch_size, example.steps, seed)
    results[str(seed)] = {}
    for name, kind, stream in runs:
      tx = make_optimizer(kind, stream, example.steps, args.lr)
      model = cnn_digits.CNN(x_train.shape[1], nnx.Rngs(seed))
      try:
        run, _ = common.train(name, model, tx, cnn_digits.cross_entropy, ((x_train[i], y_train[i]) for i in batches),
                              lambda m: cnn_digits.evaluate(m, x_test, y_test), steps=example.steps,
                              eval_every=example.steps)
      finally:
        moments.rounding_key = original_key
      losses = np.asarray(run["train_losses"], np.float64)
      finite = bool(np.all(np.isfinite(losses)))
      blowups = np.nonzero(~np.isfinite(losses) | (losses > DIVERGED))[0]
      results[str(seed)][name] = {
          "final_train_loss": run["final_train_loss"] if finite else None,
          "max_minibatch_loss": float(np.nanmax(losses)) if finite else None,
          "first_blowup_step": int(blowups[0]) + 1 if blowups.size else None,
          "diverged": not finite,
      }
      row = results[str(seed)][name]
      final = "diverged" if row["diverged"] else f"{row['final_train_loss']:.4f}"
      print(f"seed {seed}  {name:22s} final {final:>9s}  first loss > {DIVERGED:g} at step "
            f"{row['first_blowup_step']}", flush=True)

  summary = {}
  print(f"\n{'run':22s} | " + " | ".join(f"seed {s} vs fp32" for s in args.seeds) + " | diverged")
  for name, _, _ in runs:
    gaps, diverged = [], 0
    for seed in args.seeds:
      row, base = results[str(seed)][name], results[str(seed)]["fp32"]["final_train_loss"]
      diverged += row["diverged"]
      gaps.append(None if row["diverged"] else row["final_train_loss"] / base - 1)
    summary[name] = {"relative_gap_per_seed": gaps, "diverged_seeds": diverged}
    print(f"{name:22s} | " + " | ".join("   diverged  " if g is None else f"{g:+12.1%}" for g in gaps)
          + f" | {diverged}")
  args.out.write_text(json.dumps({
      "example": f"cnn_digits, SGDM lr {args.lr:g} momentum 0.9 on 4-bit Shampoo (T1=10, T2=20), 300 steps",
      "final_train_loss": "mean minibatch loss over the last 30 steps",
      "seeds": args.seeds, "runs": results, "summary": summary, "backend": jax.default_backend(),
      "wall_time_s": time.perf_counter() - start}, indent=1))
  print(f"wrote {args.out}")
  return results


if __name__ == "__main__":
  main()
