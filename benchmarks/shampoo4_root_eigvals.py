r"""Research: 4-bit Shampoo's bytes spent on an 8-bit basis plus the eigenvalues of the last root update.

The paper's ``"eigen"`` state keeps per factor a 4-bit basis :math:`U` (one eigenvector a row), float32
eigenvalues :math:`\Lambda` and a 4-bit off-diagonal inverse root refreshed every ``root_every`` steps:
about one byte per :math:`n^2` element. ``store_root=False`` spends the root's bytes on an 8-bit basis
and forms :math:`V(\Lambda + \epsilon\lambda_{\max})^{-1/4}V^\top` at every step from the *current*
eigenpairs (refreshed every ``stats_every`` steps): a different algorithm, which converges differently
from the 32-bit baseline (better on some problems, several times worse on others).
``store_root="eigvals"`` keeps the basis' bytes the same and adds one float32 vector per factor: the
eigenvalues :math:`\Lambda_r` captured at each root update, applied with the current basis,
:math:`V(\Lambda_r + \epsilon\max\lambda_r)^{-1/4}V^\top`. Unquantized, that tracks the 32-bit
baseline (whose root is :math:`V_r(\Lambda_r + \dots)^{-1/4}V_r^\top`, basis and eigenvalues of the
root update) as closely as the eigen format with a stored root does.

Variants (``adamw_shampoo4`` with illcond's Shampoo schedule, statistics every 10 and roots every 50
steps, ``min_quant_order=16``; the rows' ratio is to ``shampoo32``, the dense float32 baseline):

* ``paper_4bit``: the library's 4-bit layout (4-bit basis + 4-bit root).
* ``fp32_root``: the eigen format unquantized (``min_quant_order`` above every order) with a stored root.
* ``fp32_no_root`` / ``fp32_eigvals``: the same with ``store_root=False`` / ``"eigvals"``: the root
  semantics alone, no quantization.
* ``8bit_no_root`` / ``8bit_eigvals``: ``bits=8`` with ``store_root=False`` / ``"eigvals"`` (the paper
  layout's bytes; ``state_bytes`` column: the preconditioner of one 768x3072 matrix).
* ``8bit_eigvals_bjorck10``: also ``bjorck_steps=(1, 0)`` (no Björck step when forming each step's root).
* ``4bit_eigvals``: ``bits=4, store_root="eigvals"`` (about half the paper layout's bytes).
* ``8bit_eigvals_head16``: ``8bit_eigvals`` with the 1/16 rows of the largest eigenvalues in 16 bits
  (``head_fraction=1/16, head_bits=16, tail_rectify="qr"``): exactly the paper layout's bytes;
  ``8bit_eigvals_head16_bjorck11``: also ``bjorck_steps=(1, 1)`` (one Björck step per formed root).

Same sweep, seeds and metric as ``benchmarks/illcond.py`` (mean :math:`f - f^*` at the best learning
rate, final loss for ``mlp``; largest learning rate stable on every seed). ``--flops-only`` adds the
matrix-product flops of one step outside the refresh branches (from the compiled HLO, no timing): the
per-step cost of forming the roots.

  python benchmarks/shampoo4_root_eigvals.py [--problems ls_logunif_1e4 mlp] [--variants 8bit_eigvals]
      [--out benchmarks/results/shampoo4_root_eigvals.json] [--flops-only]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import optax_shampoo4 as s4  # noqa: E402
from benchmarks import hlo_flops, illcond  # noqa: E402

SHAMPOO = dict(weight_decay=0.0, stats_every=10, root_every=50)
QUANT = dict(min_quant_order=16)
UNQUANTIZED = dict(min_quant_order=4096)
VARIANTS = {
    "paper_4bit": dict(QUANT),
    "fp32_root": dict(UNQUANTIZED),
    "fp32_no_root": dict(UNQUANTIZED, store_root=False),
    "fp32_eigvals": dict(UNQUANTIZED, store_root="eigvals"),
    "8bit_no_root": dict(QUANT, bits=8, store_root=False),
    "8bit_eigvals": dict(QUANT, bits=8, store_root="eigvals"),
    "8bit_eigvals_bjorck10": dict(QUANT, bits=8, store_root="eigvals", bjorck_steps=(1, 0)),
    "4bit_eigvals": dict(QUANT, store_root="eigvals"),
    "8bit_eigvals_head16": dict(QUANT, bits=8, store_root="eigvals", head_fraction=1 / 16, head_bits=16,
                                tail_rectify="qr"),
    "8bit_eigvals_head16_bjorck11": dict(QUANT, bits=8, store_root="eigvals", head_fraction=1 / 16, head_bits=16,
                                         tail_rectify="qr", bjorck_steps=(1, 1)),
}
BYTES_SHAPE = (768, 3072)


def preconditioner_bytes(kwargs: dict) -> int:
  """Bytes of the preconditioner state of one ``BYTES_SHAPE`` matrix."""
  tx = s4.adamw_shampoo4(1e-3, **kwargs)
  state = jax.eval_shape(tx.init, {"w": jax.ShapeDtypeStruct(BYTES_SHAPE, jnp.float32)})
  return s4.state_nbytes(state)["preconditioner"]


def step_flops(kwargs: dict) -> int:
  """Matrix-product flops of one step outside the refresh branches (the every-step cost), one ``BYTES_SHAPE``
  matrix, counted in the compiled HLO (:func:`benchmarks.hlo_flops.dot_flops`; no timing)."""
  tx = s4.adamw_shampoo4(1e-3, **kwargs)
  params = {"w": jax.ShapeDtypeStruct(BYTES_SHAPE, jnp.float32)}
  state = jax.eval_shape(tx.init, params)
  compiled = jax.jit(tx.update).lower(params, state, params).compile()
  return hlo_flops.dot_flops(compiled.as_text())["every_call"]


def run_problem(name: str, variants: list[str], seeds: list[int], steps: int) -> dict:
  """``{row: summary}`` of ``shampoo32`` and each variant on one problem."""
  build, loss = illcond.PROBLEMS[name]
  problems = [build(seed) for seed in seeds]
  rows = {"shampoo32": illcond.make_row("shampoo32")}
  rows.update({v: s4.adamw_shampoo4(1.0, **SHAMPOO, **VARIANTS[v]) for v in variants})
  return {row: illcond.summarize(illcond.sweep(illcond.make_trainer(opt, loss, steps), problems, loss))
          for row, opt in rows.items()}


def print_table(results: dict, nbytes: dict) -> None:
  variants = [v for v in nbytes if v != "shampoo32"]
  print("\nratio of each variant's mean (best lr) to shampoo32's; * = smaller largest stable lr than shampoo32")
  print(f"{'problem':<16}" + "".join(f"{v:>30}" for v in variants))
  for name, summaries in results.items():
    ref = summaries["shampoo32"]
    cells = []
    for v in variants:
      s = summaries[v]
      less_stable = (s["largest_stable_lr"] or 0) < (ref["largest_stable_lr"] or 0)
      cells.append(f"{s['best_mean'] / ref['best_mean']:.3f}" + ("*" if less_stable else " "))
    print(f"{name:<16}" + "".join(f"{c:>30}" for c in cells))
  print(f"{'state bytes':<16}" + "".join(f"{nbytes[v]:>30,}" for v in variants) + f"   (one {BYTES_SHAPE} matrix)")


def print_flops(flops: dict) -> None:
  print(f"\nmatrix-product GFLOP per step outside the refreshes, one {BYTES_SHAPE} matrix (compiled HLO)")
  for name, value in flops.items():
    print(f"  {name:<30} {value / 1e9:8.2f}")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--problems", nargs="+", default=list(illcond.PROBLEMS), choices=list(illcond.PROBLEMS))
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--out", default=str(_ROOT / "benchmarks" / "results" / "shampoo4_root_eigvals.json"))
  parser.add_argument("--flops-only", action="store_true",
                      help="count each variant's every-step flops, add them to the existing --out JSON and exit")
  args = parser.parse_args(argv)
  if args.flops_only:
    flops = {v: step_flops(VARIANTS[v]) for v in args.variants}
    print_flops(flops)
    out = pathlib.Path(args.out)
    payload = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps({**payload, "step_flops": flops}, indent=1, default=float))
    return flops
  nbytes = {v: preconditioner_bytes(VARIANTS[v]) for v in args.variants}
  nbytes["shampoo32"] = preconditioner_bytes({"state_format": "fp32"})
  results = {}
  for name in args.problems:
    results[name] = run_problem(name, args.variants, args.seeds, args.steps)
    pathlib.Path(args.out).write_text(json.dumps(
        {"steps": args.steps, "seeds": args.seeds, "variants": VARIANTS, "preconditioner_bytes": nbytes,
         "bytes_shape": BYTES_SHAPE, "problems": results}, indent=1, default=float))
    print_table({name: results[name]}, nbytes)
  print_table(results, nbytes)
  return results


if __name__ == "__main__":
  main()
