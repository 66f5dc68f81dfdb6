r"""Research: which 4-bit quantity costs 4-bit Shampoo / Distributed Shampoo their accuracy on ill-conditioned problems.

The ``"eigen"`` state keeps a 4-bit basis :math:`U` (one eigenvector a row), float32 eigenvalues
:math:`\Lambda` and a 4-bit off-diagonal inverse root. Each variant below removes (or adds) one source
of error by replacing a factor-maths function *in this process only* (the library is not changed):

* ``4bit``: the library as it is.
* ``eigen_fp32``: nothing quantized (basis and root float32): the eigen-format maths alone.
* ``root_4bit_only``: float32 basis, 4-bit root (the root's quantization alone).
* ``basis_4bit_only``: 4-bit basis re-encoded at every statistics update, float32 root (the basis'
  quantization alone, in both the statistic and the root).
* ``basis_at_root_only``: the statistic keeps a float32 basis (exact :math:`V\Lambda V^\top`); the
  root is formed from that basis encoded to 4 bits and Björck-rectified, stored in float32 (the
  quantized basis only where the root uses it).
* ``no_bjorck``: the library with ``bjorck_steps=(0, 0)``.
* ``no_floor``: the library with ``quant_damping=0`` (Distributed Shampoo's floor; Shampoo has none).
* ``head8_<f>_root_fp32``: ``basis_4bit_only`` with the first fraction ``f`` of each basis' rows (the
  largest eigenvalues) in 8 bits and the rest Gram–Schmidt-orthogonalized against them (the
  ``head_fraction`` / ``tail_rectify="qr"`` storage SOAP uses).
* ``eigen_fp32_no_root``: ``eigen_fp32`` with ``store_root=False`` (the root formed from the current
  eigenpairs at every step: a fresher root, no quantization).
* ``basis8_no_root``: the library with ``bits=8, store_root=False``, the root's bytes spent on an 8-bit
  basis (the state is as large as the 4-bit basis plus the 4-bit root; slightly smaller: no float32 root
  diagonal); ``basis8_no_root_bjorck11`` / ``_bjorck10`` (Distributed Shampoo only): also
  ``bjorck_steps=(1, 1)`` / ``(1, 0)``, the latter ``distributed_shampoo4``'s default quantized layout.

Findings (``ls_logunif_1e4``, ratio to the float32 twin; ``deeplinear`` in brackets): the library 155×
(1.25×) for Shampoo, 26× (3.2×) for Distributed Shampoo; the root's quantization alone 70× / 156× (0.9× /
0.6×) and unstable at the twin's best learning rate; the basis' quantization alone 80× / 23× (1.3× / 5.2×);
the basis quantized only where the root uses it, the statistic exact, 3.1× / 0.8× (1.0× / 0.6×): the
loss is the statistic re-encoded through 4-bit eigenvectors at each refresh, plus the 4-bit root.
Without Björck steps it is worse (460× / 160×); without the floor no better. An 8-bit head (1/8, 1/4 of
the rows) recovers Shampoo's statistic (3.3×, 1.7× with a float32 root) but not Distributed Shampoo's
(14×, 6.4×), which folds every step. ``basis8_no_root``: Distributed Shampoo 1.07× (0.8×), 0.97× with
``bjorck_steps=(1, 1)``, 1.05× with ``(1, 0)``, and on every other problem within 1.04× or better but on
the two solved to the float32 floor (:math:`f - f^* \approx 10^{-12}`: 1.14–1.19×, the 4-bit 1.5×);
Shampoo 3.0× (1.5×), like ``eigen_fp32_no_root`` (its twin stores a root refreshed every 50 steps; a root
formed at every step converges differently), and worse than 4-bit on ``ls_power_1e2`` and both
``logreg`` problems.

Rows: ``adamw_shampoo4`` (illcond's Shampoo schedule) and ``distributed_shampoo4`` in the paper's layout
(``store_root=True``: a 4-bit basis and a stored 4-bit root; statistics every step, roots every 10),
``min_quant_order=16``, plus the float32 twins (``shampoo32``, ``ds_fp32``) as
the reference. Same sweep, seeds and metric (mean :math:`f - f^*` at the best learning rate) as
``benchmarks/illcond.py``:

  python benchmarks/shampoo4_quant_sources.py [--problems ls_logunif_1e4 deeplinear] [--variants 4bit eigen_fp32]
      [--out benchmarks/results/shampoo4_quant_sources.json] [--merge]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import pathlib
import sys

import jax.numpy as jnp

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import optax_shampoo4 as s4  # noqa: E402
from benchmarks import illcond  # noqa: E402
from optax_shampoo4 import factors as fct  # noqa: E402
from optax_shampoo4 import linalg, roots  # noqa: E402

# illcond.py's rows: Shampoo's schedule, Distributed Shampoo's (Meta's) schedule, quantized small factors.
SHAMPOO = dict(weight_decay=0.0, stats_every=10, root_every=50)
DS = dict(stats_every=1, root_every=10)
QUANT = dict(min_quant_order=16)
# distributed_shampoo4 in the paper's layout (4-bit basis, stored 4-bit root), which the variants change.
PAPER_LAYOUT = dict(store_root=True)
_ORIGINAL = {"store_eigvecs": fct.FactorConfig.store_eigvecs, "store": fct.FactorConfig.store,
             "head_rows": fct.FactorConfig.head_rows, "rectified": fct.rectified,
             "root_from_eigenbasis": fct.root_from_eigenbasis}


def _float_basis(self, rows, quantized):
  return rows.astype(jnp.float32)


def _float_root(self, matrix, quantized, separate_diag):
  if separate_diag:  # the roots (and nothing else of the "eigen" format) are stored with a separate diagonal
    return matrix.astype(jnp.float32)
  return _ORIGINAL["store"](self, matrix, quantized, separate_diag)


def _root_from_quantized_basis(config, bucket, epsilon, precision="highest"):
  rows = fct.load(bucket.eigvecs)
  rows = fct.rectified(_ORIGINAL["store_eigvecs"](config, rows, True), config.bjorck_steps[1])
  return roots.inverse_root_from_eig(linalg.transpose(rows), bucket.eigvals, jnp.asarray(epsilon, jnp.float32),
                                     absolute=config.absolute_epsilon, precision=precision,
                                     relative_floor=config.quant_damping)


def _head_rows(fraction):
  def head_rows(self, order):
    return 0 if order < 2 else min(order - 1, max(1, math.ceil(order * fraction)))
  return head_rows


def _rectified_tail_qr(stored, steps, tail_steps=None, tail_qr=False):
  return _ORIGINAL["rectified"](stored, steps, tail_steps, tail_qr=True)


# variant -> (replacements {attribute: value} on FactorConfig or the factors module, Shampoo kwargs, DS kwargs)
VARIANTS = {
    "4bit": ({}, {}, {}),
    "eigen_fp32": ({"store_eigvecs": _float_basis, "store": _float_root}, {}, {}),
    "root_4bit_only": ({"store_eigvecs": _float_basis}, {}, {}),
    "basis_4bit_only": ({"store": _float_root}, {}, {}),
    "basis_at_root_only": ({"store_eigvecs": _float_basis, "store": _float_root,
                            "root_from_eigenbasis": _root_from_quantized_basis}, {}, {}),
    "no_bjorck": ({}, {"bjorck_steps": (0, 0)}, {"bjorck_steps": (0, 0)}),
    "no_floor": ({}, None, {"quant_damping": 0.0}),
    "head8_0.125_root_fp32": ({"store": _float_root, "head_rows": _head_rows(0.125),
                               "rectified": _rectified_tail_qr}, {}, {}),
    "head8_0.25_root_fp32": ({"store": _float_root, "head_rows": _head_rows(0.25),
                              "rectified": _rectified_tail_qr}, {}, {}),
    "eigen_fp32_no_root": ({"store_eigvecs": _float_basis, "store": _float_root}, {"store_root": False},
                           {"store_root": False}),
    "basis8_no_root": ({}, {"bits": 8, "store_root": False}, {"bits": 8, "store_root": False}),
    "basis8_no_root_bjorck11": ({}, None, {"bits": 8, "store_root": False, "bjorck_steps": (1, 1)}),
    "basis8_no_root_bjorck10": ({}, None, {"bits": 8, "store_root": False, "bjorck_steps": (1, 0)}),
}
_METHODS = ("store_eigvecs", "store", "head_rows")


@contextlib.contextmanager
def replaced(replacements: dict):
  """Sets the factor maths' functions of one variant for the duration of the block."""
  try:
    for name, value in replacements.items():
      setattr(fct.FactorConfig if name in _METHODS else fct, name, value)
    yield
  finally:
    for name in replacements:
      setattr(fct.FactorConfig if name in _METHODS else fct, name, _ORIGINAL[name])


def _optimizers(variant: str) -> dict:
  _, shampoo_kw, ds_kw = VARIANTS[variant]
  opts = {}
  if shampoo_kw is not None:
    opts["shampoo4"] = s4.adamw_shampoo4(1.0, **SHAMPOO, **QUANT, **shampoo_kw)
  if ds_kw is not None:
    opts["ds_4bit"] = s4.distributed_shampoo4(1.0, **DS, **QUANT, **{**PAPER_LAYOUT, **ds_kw})
  return opts


def run_problem(name: str, variants: list[str], seeds: list[int], steps: int, known: dict) -> dict:
  """The summaries of the float32 twins (unless already ``known``) and of each variant's rows on one problem."""
  build, loss = illcond.PROBLEMS[name]
  problems = [build(seed) for seed in seeds]
  out = dict(known)
  for row in ("shampoo32", "ds_fp32"):
    if f"{row}/reference" in out:
      continue
    out[f"{row}/reference"] = illcond.summarize(illcond.sweep(illcond.make_trainer(illcond.make_row(row), loss, steps),
                                                              problems, loss))
  for variant in variants:
    with replaced(VARIANTS[variant][0]):
      for row, opt in _optimizers(variant).items():
        out[f"{row}/{variant}"] = illcond.summarize(illcond.sweep(illcond.make_trainer(opt, loss, steps), problems, loss))
  return out


def print_problem(name: str, summaries: dict) -> None:
  print(f"\n{name} (f - f*: mean at the best lr, ratio to the row's float32 twin, largest stable lr; mean per lr)")
  for key, s in summaries.items():
    ref = summaries["shampoo32/reference" if key.startswith("shampoo") else "ds_fp32/reference"]["best_mean"]
    sweep = " ".join(f"{lr:.2g}:{m:.3g}" for lr, m in zip(s["lrs"], s["means"]) if lr >= 0.01)
    print(f"  {key:<32} {s['best_mean']:10.4g} @ {s['best_lr']:<5.2g} x{s['best_mean'] / ref:<8.3g} "
          f"stable<={s['largest_stable_lr']}  [{sweep}]")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--problems", nargs="+", default=["ls_logunif_1e4", "deeplinear"])
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--out", default=str(_ROOT / "benchmarks" / "results" / "shampoo4_quant_sources.json"))
  parser.add_argument("--merge", action="store_true", help="update the existing JSON's entries instead of replacing it")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  results = json.loads(out.read_text())["problems"] if args.merge and out.exists() else {}
  for name in args.problems:
    results[name] = run_problem(name, args.variants, args.seeds, args.steps, results.get(name, {}))
    print_problem(name, results[name])
    out.write_text(json.dumps({"steps": args.steps, "seeds": args.seeds, "problems": results}, indent=1,
                              default=float))
  return results


if __name__ == "__main__":
  main()
