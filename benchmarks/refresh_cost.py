"""What one refresh of each root / eigenbasis method compiles to: matmul flops, decompositions, loops.

Run:  python benchmarks/refresh_cost.py [--out benchmarks/results/refresh_cost.json]

Wall-clock refresh times (``benchmarks/speed.py``) are CPU times here. On GPU/TPU-style hardware what
matters is the kind of work: matrix products run at full speed, eigendecompositions and QR are slow,
serial library calls, and a ``while`` loop (Newton's iteration to a tolerance) is a data-dependent number
of sequential steps. This script compiles, on the transformer example's parameter tree (orders 64-512),
the statistics refresh and the root refresh of every factor (the shared engine's ``refresh_stats`` /
``refresh_roots``, as ``scale_by_shampoo4`` calls them) for each method and counts in the optimized HLO
(:mod:`benchmarks.hlo_flops`):

* matrix-product flops per refresh (``dot`` instructions; Newton's loop body counted once per iteration
  it *may* run is not knowable statically, so its flops are per iteration, marked as such);
* decomposition calls (``custom-call`` targets of eigh / QR / Householder routines);
* ``while`` loops.

Deterministic; no timing. On CPU each factor's decomposition is its own library call (see
``linalg.py``), so the counts are per factor.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.hlo_flops import dot_flops  # noqa: E402
from benchmarks.speed import MODEL_SIZES, decoder_params  # noqa: E402
from optax_shampoo4 import engine  # noqa: E402
from optax_shampoo4 import factors as fct  # noqa: E402
from optax_shampoo4.options import DEFAULT_REFRESH_METHOD, DEFAULT_REFRESH_TOL  # noqa: E402

METHODS = {
    "eigen, qr (the paper)": dict(refresh_method="qr"),
    "eigen, eigh": dict(refresh_method="eigh"),
    "eigen, adaptive (default)": dict(),
    "naive, newton": dict(state_format="naive"),
    "naive, jorge": dict(state_format="naive", root_method="jorge"),
    "fp32, newton": dict(state_format="fp32"),
}
_DECOMPOSITION = re.compile(r'custom_call_target="([^"]*(?:syevd|heevd|geqrf|orgqr|householder|qr|eig|syev)[^"]*)"',
                            re.IGNORECASE)


def _counts(fn, *args) -> dict:
  text = jax.jit(fn).lower(*args).compile().as_text()
  flops = dot_flops(text)
  targets = _DECOMPOSITION.findall(text)
  return {"dot_flops": flops["every_call"] + flops["in_branches"], "decompositions": len(targets),
          "decomposition_targets": sorted(set(targets)), "while_loops": len(re.findall(r"\bwhile\(", text))}


def refresh_counts(options: dict, params) -> dict:
  """HLO counts of the statistics refresh (PU) and the root refresh (PIRU) of every factor of ``params``."""
  state_format = options.get("state_format", "eigen")
  root_method = options.get("root_method") or ("eigen" if state_format == "eigen" else "newton")
  config = fct.FactorConfig(state_format, 4, "linear2", 64, (1, 4), root_method,
                            refresh_method=options.get("refresh_method", DEFAULT_REFRESH_METHOD),
                            refresh_tol=DEFAULT_REFRESH_TOL, jorge_damping=1e-6)
  factor_engine = engine.FactorEngine(config, 1024, 64)
  plan = factor_engine.plan(params)
  buckets = factor_engine.init_buckets(plan, 1e-6)
  matrices = engine.matrix_views(jax.tree.leaves(params), plan)
  beta, epsilon = jnp.float32(0.95), jnp.float32(1e-6)
  stats = _counts(lambda b, m: factor_engine.refresh_stats(b, plan, m, beta), buckets, matrices)
  roots = _counts(lambda b: factor_engine.refresh_roots(b, epsilon, plan), buckets)
  return {"stats_refresh": stats, "root_refresh": roots}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path,
                      default=pathlib.Path(__file__).parent / "results" / "refresh_cost.json")
  args = parser.parse_args(argv)
  params = decoder_params(jax.random.key(0), **MODEL_SIZES["tiny"])
  results = {name: refresh_counts(options, params) for name, options in METHODS.items()}
  print(f"{'method':28s} {'stats: GFLOP':>12s} {'decomp.':>8s} {'loops':>6s} {'root: GFLOP':>12s} {'decomp.':>8s} "
        f"{'loops':>6s}")
  for name, r in results.items():
    s, t = r["stats_refresh"], r["root_refresh"]
    print(f"{name:28s} {s['dot_flops'] / 1e9:12.3f} {s['decompositions']:8d} {s['while_loops']:6d} "
          f"{t['dot_flops'] / 1e9:12.3f} {t['decompositions']:8d} {t['while_loops']:6d}")
  print("GFLOP: matrix products per refresh of all factors (a while loop's body counted once); decomp.: "
        "eigh/QR library calls; loops: while loops (Newton iterates to a tolerance)")
  args.out.write_text(json.dumps({"model": "transformer_lm example (tiny)", "backend": jax.default_backend(),
                                  "results": results}, indent=1))
  print(f"wrote {args.out.name}")
  return results


if __name__ == "__main__":
  main()
