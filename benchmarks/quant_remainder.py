"""Candidates for closing 4-bit Shampoo's remaining eigenvector error at about the paper's memory.

Run:  python benchmarks/quant_remainder.py [--order 512] [--out benchmarks/results/quant_remainder.json]

For each candidate storage of the eigenvector matrix (rows = eigenvectors, descending eigenvalue) it
reports the average bits per stored element (codes and float32 scales) and the error of the inverse root
the optimizer would use,

  NRE = ||V^T f(Lambda) V - f(A)||_F / ||f(A)||_F,   f(x) = (x + eps max lambda)^(-1/4),  eps = 1e-6,

with V the dequantized rows after 4 Björck steps (``factors.update_root``'s recipe), against float64
``eigh``. Candidates (budget: the paper's ≈ 4.5 bits, target ≤ 4.6):

* ``4-bit`` (the library default, Linear-2, blocks of 64) and ``8-bit`` (the fidelity reference);
* **precision by eigenvalue**: the eigenvectors of the smallest eigenvalues (the root amplifies their
  errors by ``λ^(-1/4)``) in 8 bits, others in 4 or 3 bits: ``4/8 97.5/2.5`` and ``3/4/8 50/35/15`` fit
  4.6 bits, ``4/8 50/50`` (6.5 bits) shows the trend;
* **smaller blocks**: 32 elements per scale (5.0 bits);
* **a fitted codebook**: Lloyd-Max on the absmax-normalized entries of a Haar-random orthogonal matrix
  (blocks of 64), 16 values with a forced 0 and ±1 (4.5 bits).

Matrices: the synthetic two-level A2 of ``quant_error.py`` (half the eigenvalues at 1, half at 1e-4), a
power-law spectrum ``λ_i = i^-1.5`` with a Haar basis, and the order-512 statistic captured from a digits
MLP (``quant_error.capture_real_statistic``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import quant_error as qe  # noqa: E402
from optax_shampoo4 import linalg  # noqa: E402
from optax_shampoo4 import quantization as qz  # noqa: E402

EPSILON = 1e-6
BJORCK_STEPS = 4
# name -> [(fraction of rows from the largest eigenvalue down, bits, block)], codebook
CANDIDATES = {
    "4-bit (default)": ([(1.0, 4, 64)], "linear2"),
    "8-bit": ([(1.0, 8, 64)], "linear2"),
    "4/8 97.5/2.5": ([(0.975, 4, 64), (0.025, 8, 64)], "linear2"),
    "3/4/8 50/35/15": ([(0.5, 3, 64), (0.35, 4, 64), (0.15, 8, 64)], "linear2"),
    "4/8 50/50": ([(0.5, 4, 64), (0.5, 8, 64)], "linear2"),
    "4-bit, blocks of 32": ([(1.0, 4, 32)], "linear2"),
    "4-bit, Lloyd-Max codebook": ([(1.0, 4, 64)], "lloyd"),
}


def lloyd_codebook(order: int = 512, bits: int = 4, block: int = 64, iterations: int = 60) -> np.ndarray:
  """Lloyd-Max levels for absmax-normalized blocks of a Haar-random orthogonal matrix (0 and ±1 kept)."""
  q, r = np.linalg.qr(np.random.default_rng(1).standard_normal((order, order)))
  q = q * np.sign(np.diag(r))
  blocks = q.reshape(order, order // block, block)
  samples = (blocks / np.abs(blocks).max(-1, keepdims=True)).ravel()
  levels = np.sort(np.concatenate([np.linspace(-1, 1, 2**bits - 1), [0.0]]))
  for _ in range(iterations):
    index = np.searchsorted((levels[1:] + levels[:-1]) / 2, samples)
    for j, level in enumerate(levels):
      chosen = samples[index == j]
      if chosen.size and level not in (-1.0, 0.0, 1.0):
        levels[j] = chosen.mean()
    levels = np.sort(levels)
  return levels


def quantize_rows(rows: np.ndarray, plan, table: np.ndarray | None) -> tuple[np.ndarray, float]:
  """Dequantized rows stored by ``plan``; and the average bits per element (codes + float32 scales)."""
  n = rows.shape[0]
  parts, bits_total, start = [], 0.0, 0
  for i, (fraction, bits, block) in enumerate(plan):
    stop = n if i == len(plan) - 1 else start + int(round(fraction * n))
    part = rows[start:stop]
    if table is None:
      parts.append(np.asarray(qz.dequantize(qz.quantize(jnp.asarray(part, jnp.float32), "linear2", bits, block))))
    else:  # a custom codebook: absmax blocks, nearest level (as quantization.quantize does)
      out = np.empty_like(part)
      mids = (table[1:] + table[:-1]) / 2
      for s in range(0, part.shape[1], block):
        b = part[:, s:s + block]
        scale = np.abs(b).max(1, keepdims=True)
        scale[scale == 0] = 1.0
        out[:, s:s + block] = table[np.searchsorted(mids, b / scale)] * scale
      parts.append(out)
    bits_total += (stop - start) * (n * bits + -(-n // block) * 32)
    start = stop
  return np.concatenate(parts).astype(np.float64), bits_total / (n * n)


def root_nre(a: np.ndarray, plan, table) -> tuple[float, float]:
  a, u, lam = qe.eig_f64(a)
  order = np.argsort(-lam)
  u, lam = u[:, order], np.maximum(lam[order], 0.0)
  scale = (lam + EPSILON * lam.max()) ** -0.25
  exact = (u * scale) @ u.T
  rows, bits = quantize_rows(u.T, plan, table)
  v = np.asarray(linalg.bjorck(jnp.asarray(rows, jnp.float32), BJORCK_STEPS), np.float64)
  approx = v.T @ np.diag(scale) @ v
  return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact)), bits


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--order", type=int, default=512)
  parser.add_argument("--out", type=pathlib.Path,
                      default=pathlib.Path(__file__).parent / "results" / "quant_remainder.json")
  args = parser.parse_args(argv)
  rng = np.random.default_rng(0)
  haar, _ = np.linalg.qr(rng.standard_normal((args.order, args.order)))
  matrices = {
      "A2 (two levels)": qe.synthetic_a2(args.order, 0, 0.5, 1e4)[0],
      "power law": (haar * np.arange(1, args.order + 1.0) ** -1.5) @ haar.T,
      "digits MLP statistic": qe.capture_real_statistic(hidden=args.order),
  }
  lloyd = lloyd_codebook(args.order)
  results = {}
  for name, (plan, codebook) in CANDIDATES.items():
    table = lloyd if codebook == "lloyd" else None
    row = {m: root_nre(a, plan, table) for m, a in matrices.items()}
    results[name] = {"bits_per_element": next(iter(row.values()))[1],
                     "root_nre": {m: nre for m, (nre, _) in row.items()}}
  baseline = results["4-bit (default)"]["root_nre"]
  print(f"{'candidate':28s} {'bits':>5s} " + " ".join(f"{m:>22s}" for m in matrices))
  for name, r in results.items():
    cells = [f"{r['root_nre'][m]:.4f} ({r['root_nre'][m] / baseline[m]:.2f}x)" for m in matrices]
    print(f"{name:28s} {r['bits_per_element']:5.2f} " + " ".join(f"{c:>22s}" for c in cells))
  print("root NRE (ratio to the 4-bit default); bits: codes + float32 scales per stored element")
  out = {"settings": {"order": args.order, "epsilon": EPSILON, "bjorck_steps": BJORCK_STEPS,
                      "lloyd_codebook": lloyd.tolist()}, "results": results}
  args.out.write_text(json.dumps(out, indent=1))
  print(f"wrote {args.out.name}")
  return out


if __name__ == "__main__":
  main()
