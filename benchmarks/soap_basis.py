"""Where 4-bit SOAP loses to fp32 SOAP on the CNN example, and what the 8-bit head rows recover.

Run:  python benchmarks/soap_basis.py [--seeds 0 1 2] [--out benchmarks/results/soap_basis.json]

``examples/cnn_digits.py``'s SOAP runs (lr 3e-3, 300 steps) with the basis stored or used in different ways.
Two rows are diagnostics that patch :func:`optax_shampoo4.factors.rectified`, which
:func:`~optax_shampoo4.scale_by_soap4` calls on its stored bases before every rotation (with ``tail_steps=0``)
and before every refresh (``tail_steps=None``):

* ``fp32``: ``state_format="fp32"`` (the reference);
* ``fp32 statistic, 4-bit use`` / ``8-bit use`` (diagnostic): fp32 storage, but each step's rotation uses the
  basis quantized to 4 / 8 bits (Linear-2, blocks of 64) and Björck-rectified once; refreshes see the exact
  fp32 basis. Separates the 4-bit *use* of the basis from the drift of a 4-bit *statistic*;
* ``4-bit, no head``: every row in 4 bits (``head_fraction=0``);
* ``4-bit, 1/16 head, symmetric Björck`` (diagnostic): the default storage, rectified by one symmetric Björck
  step over all rows instead of head first;
* ``4-bit, 1/64 head``: ``head_fraction=1/64``;
* ``4-bit, 1/16 head`` (the default): head first, the tail only projected at each step;
* ``4-bit, 1/16 head, tail Björck every step`` (diagnostic): the tail also Björck-rectified before each rotation.

Prints the final training loss (mean minibatch loss over the last 30 steps) per seed and the mean's gap to fp32,
and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import numpy as np
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import cnn_digits  # noqa: E402
import common  # noqa: E402

import optax_shampoo4 as s4  # noqa: E402
from optax_shampoo4 import factors, linalg  # noqa: E402
from optax_shampoo4 import quantization as qz  # noqa: E402

LR = 3e-3
ORIGINAL_RECTIFIED = factors.rectified


def _use_quantized(bits: int):
  """``rectified`` that quantizes fp32 bases (order >= 64) where each step uses them (diagnostic)."""

  def rectified(stored, steps, tail_steps=None):
    if tail_steps is None or factors.is_quantized(stored) or stored.shape[-1] < 64:
      return ORIGINAL_RECTIFIED(stored, steps, tail_steps)
    return linalg.bjorck(qz.dequantize(qz.quantize(stored, "linear2", bits, 64)), 1)

  return rectified


def _symmetric(stored, steps, tail_steps=None):
  """``rectified`` with one symmetric Björck step over all rows of split storage (diagnostic)."""
  if isinstance(stored, qz.SplitRowsQuantized):
    return linalg.bjorck(factors.load(stored), max(steps, 1))
  return ORIGINAL_RECTIFIED(stored, steps, tail_steps)


def _tail_every_step(stored, steps, tail_steps=None):
  """``rectified`` that also Björck-rectifies the tail before each rotation (diagnostic)."""
  return ORIGINAL_RECTIFIED(stored, steps, None)


# name -> (soap4 options, patched rectified or None)
VARIANTS = {
    "fp32": ({"state_format": "fp32"}, None),
    "fp32 statistic, 4-bit use": ({"state_format": "fp32"}, _use_quantized(4)),
    "fp32 statistic, 8-bit use": ({"state_format": "fp32"}, _use_quantized(8)),
    "4-bit, no head": ({"head_fraction": 0.0}, None),
    "4-bit, 1/16 head, symmetric Björck": ({}, _symmetric),
    "4-bit, 1/64 head": ({"head_fraction": 1 / 64}, None),
    "4-bit, 1/16 head (default)": ({}, None),
    "4-bit, 1/16 head, tail Björck every step": ({}, _tail_every_step),
}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / "soap_basis.json")
  args = parser.parse_args(argv)
  example = cnn_digits.parse_args([])
  _, x_train, y_train, x_test, y_test = cnn_digits.load_data(example.dataset)
  start = time.perf_counter()
  results: dict[str, dict[str, float]] = {name: {} for name in VARIANTS}
  for seed in args.seeds:
    batches = common.minibatch_indices(len(x_train), example.batch_size, example.steps, seed)
    for name, (options, patch) in VARIANTS.items():
      factors.rectified = patch or ORIGINAL_RECTIFIED
      try:
        tx = s4.soap4(common.learning_rate_schedule(LR, example.steps), weight_decay=example.weight_decay,
                      min_quant_order=common.MIN_QUANT_ORDER, **options)
        model = cnn_digits.CNN(x_train.shape[1], nnx.Rngs(seed))
        run, _ = common.train(name, model, tx, cnn_digits.cross_entropy, ((x_train[i], y_train[i]) for i in batches),
                              lambda m: cnn_digits.evaluate(m, x_test, y_test), steps=example.steps,
                              eval_every=example.steps)
      finally:
        factors.rectified = ORIGINAL_RECTIFIED
      results[name][str(seed)] = run["final_train_loss"]
      print(f"seed {seed}  {name:42s} {run['final_train_loss']:.4f}", flush=True)

  reference = np.mean(list(results["fp32"].values()))
  summary = {}
  print(f"\n{'basis':42s} | " + " | ".join(f"seed {s:>2d}" for s in args.seeds) + " |   mean | vs fp32")
  for name, per_seed in results.items():
    values = [per_seed[str(s)] for s in args.seeds]
    summary[name] = {"mean": float(np.mean(values)), "relative_gap": float(np.mean(values) / reference - 1)}
    print(f"{name:42s} | " + " | ".join(f"{v:7.4f}" for v in values)
          + f" | {np.mean(values):.4f} | {summary[name]['relative_gap']:+.1%}")
  args.out.write_text(json.dumps({
      "example": f"cnn_digits, SOAP lr {LR}, {example.steps} steps", "seeds": args.seeds,
      "final_train_loss": "mean minibatch loss over the last 30 steps", "runs": results, "summary": summary,
      "backend": jax.default_backend(), "wall_time_s": time.perf_counter() - start}, indent=1))
  print(f"wrote {args.out}")
  return results


if __name__ == "__main__":
  main()
