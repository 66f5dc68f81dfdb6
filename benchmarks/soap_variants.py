"""Research: which low-memory statistic / basis storage brings SOAP back to the authors' dense semantics.

Variants of the dense float32 SOAP of ``benchmarks/soap_reference.py`` (all with the reference's first
``eigh`` basis, sort, one QR step every 10 steps, ``v`` permuted), differing in how the statistic is kept
and what a low-bit store does to the statistic and to each new basis:

* ``dense``: the reference (a float32 n x n accumulator per factor, every gradient folded);
* ``refresh``: the library's current ``soap4`` statistic (eigen-pair, folded at refresh steps only,
  ``shampoo_beta`` 0.95 per refresh), and ``refresh_b0.6`` (0.95^10: the reference's time constant);
* ``eigen``: eigen-pair statistic whose eigenvalues follow every gradient in the current basis
  (``lambda <- b lambda + (1-b) diag(Q^T G G^T Q)``), the refresh step adding the off-diagonal part of its
  own gradient (no extra memory over ``refresh``);
* ``dense_q8`` / ``dense_q4``: the dense accumulator stored in 8 bits (dynamic tree) / 4 bits (linear-2),
  blocks of 64 along rows;
* ``*+h<k>fp32_t4`` / ``*+h<k>b8_t4``: the ``k`` leading eigenvectors (largest eigenvalues) in float32 /
  8 bits, the others in 4 bits made exactly orthogonal to them (then QR);
* ``*+b4`` / ``*+b8``: the basis stored in 4 / 8 bits (linear-2, blocks of 64 along each eigenvector), as
  the library's quantized eigenvectors, with one Björck step; ``m`` is re-projected only at basis
  changes.

Problems and metric as ``benchmarks/illcond.py`` (suboptimality or final loss, mean over seeds at the
best learning rate of a sweep, plus the whole sweep):

  python benchmarks/soap_variants.py [--problems ls_logunif_1e6 deeplinear mlp] [--seeds 0 1]
      [--steps 300] [--out benchmarks/results/soap_variants.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import optax_shampoo4 as s4  # noqa: E402
from benchmarks import illcond  # noqa: E402
from benchmarks.soap_reference import soap_reference  # noqa: E402


def rows_quantizer(bits: int, mapping: str):
  """Quantize-dequantize a matrix by rows (as the library stores eigenvectors: one per row)."""
  def apply(m: jax.Array) -> jax.Array:
    return s4.quantization.dequantize(s4.quantization.quantize(m, mapping=mapping, bits=bits, block=64))
  return apply


def basis_quantizer(bits: int, bjorck_steps: int = 1):
  """Eigenvectors stored by rows in ``bits``, then ``bjorck_steps`` Björck iterations (as the library)."""
  rows = rows_quantizer(bits, "linear2")
  return lambda q: s4.linalg.bjorck(rows(q.T).T, steps=bjorck_steps)


def head_tail_quantizer(head: int, head_bits: int | None, tail_bits: int = 4):
  """Leading ``head`` columns (largest eigenvalues) in ``head_bits`` (None: float32), the rest in
  ``tail_bits``, the tail then made exactly orthogonal to the stored head and orthonormalized by QR."""
  tail_q = rows_quantizer(tail_bits, "linear2")
  head_q = (lambda m: m) if head_bits is None else rows_quantizer(head_bits, "linear2")

  def apply(q):
    h = s4.linalg.bjorck(head_q(q[:, :head].T).T, steps=0 if head_bits is None else 2)
    t = tail_q(q[:, head:].T).T
    t = t - s4.linalg.matmul(h, s4.linalg.matmul(h.T, t))
    return jax.numpy.concatenate([h, s4.linalg.orthonormal_basis(t)], axis=1) if t.shape[1] else h
  return apply


VARIANTS = {
    "dense": dict(),
    "refresh": dict(statistic="refresh"),
    "refresh_b0.6": dict(statistic="refresh", shampoo_beta=0.6),
    "eigen": dict(statistic="eigen"),
    "dense_q8": dict(statistic_quantizer=rows_quantizer(8, "dynamic_tree")),
    "dense_q4": dict(statistic_quantizer=rows_quantizer(4, "linear2")),
    "dense+b4": dict(basis_quantizer=basis_quantizer(4)),
    "refresh+b4": dict(statistic="refresh", basis_quantizer=basis_quantizer(4)),
    "refresh_b0.6+b4": dict(statistic="refresh", shampoo_beta=0.6, basis_quantizer=basis_quantizer(4)),
    "eigen+b4": dict(statistic="eigen", basis_quantizer=basis_quantizer(4)),
    "eigen+b8": dict(statistic="eigen", basis_quantizer=basis_quantizer(8)),
    "dense+h8fp32_t4": dict(basis_quantizer=head_tail_quantizer(8, None)),
    "dense+h16fp32_t4": dict(basis_quantizer=head_tail_quantizer(16, None)),
    "dense+h4fp32_t4": dict(basis_quantizer=head_tail_quantizer(4, None)),
    "dense+h8b8_t4": dict(basis_quantizer=head_tail_quantizer(8, 8)),
    "refresh+h8fp32_t4": dict(statistic="refresh", basis_quantizer=head_tail_quantizer(8, None)),
}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--problems", nargs="+", default=["ls_logunif_1e6", "deeplinear", "mlp"])
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--lrs", nargs="+", type=float, default=[0.01, 0.0316, 0.1, 0.316, 1.0])
  parser.add_argument("--out", default=str(_ROOT / "benchmarks" / "results" / "soap_variants.json"))
  args = parser.parse_args(argv)
  illcond.BASE_LRS = tuple(sorted(args.lrs))
  results = {}
  for name in args.problems:
    build, loss = illcond.PROBLEMS[name]
    problems = [build(seed) for seed in args.seeds]
    summaries = {}
    for variant in args.variants:
      opt = soap_reference(1.0, weight_decay=0.0, **VARIANTS[variant])
      trainer = illcond.make_trainer(opt, loss, args.steps)
      summaries[variant] = illcond.summarize(illcond.sweep(trainer, problems, loss))
    metric = "f - f*" if problems[0].fstar is not None else "final loss"
    ref = summaries.get("dense", {}).get("best_mean")
    print(f"\n{name} ({metric}; ratio to dense at the best lr; mean per lr)")
    for variant, s in summaries.items():
      ratio = s["best_mean"] / ref if ref else float("nan")
      sweep = " ".join(f"{lr:.2g}:{m:.3g}" for lr, m in zip(s["lrs"], s["means"]))
      print(f"  {variant:<16} best {s['best_mean']:.4g} @ {s['best_lr']:.2g}  x{ratio:.3g}   [{sweep}]")
    results[name] = {"metric": metric, "summary": summaries}
    out = pathlib.Path(args.out)
    out.write_text(json.dumps({"steps": args.steps, "seeds": args.seeds, "problems": results}, indent=1,
                              default=float))
  return results


if __name__ == "__main__":
  main()
