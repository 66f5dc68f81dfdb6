"""What an 8-bit moment store costs, part by part, on this machine (the choices behind ``moment_storage``).

Run:  python benchmarks/moment_store_parts.py [--size 1048576] [--repeats 20] [--out FILE.json]

Times, jitted, over ``--size`` float32 values in [-1, 1] (a 1024-wide last axis), each alternative of the three
parts of :func:`optax_shampoo4.moment_storage.store_moment` at 8 bits:

* the codebook search (256 codes): ``jnp.searchsorted`` (unrolled binary search) vs
  :func:`optax_shampoo4.code_search.sorted_search` (bucket lookup);
* stochastic rounding with that lookup, its uniform bits from ``jax.random.uniform`` (threefry) vs
  :func:`optax_shampoo4.moment_storage.rounding_uniform` (counter hash);
* the signed block scale (blocks of 256): argmax of ``|x|`` and a gather vs the block's max and min.

Prints a table of medians and writes JSON (default ``benchmarks/results/moment_store_parts.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from optax_shampoo4 import code_search  # noqa: E402
from optax_shampoo4 import moment_storage as ms  # noqa: E402
from optax_shampoo4 import quantization as qz  # noqa: E402

TABLE = np.asarray(qz.codebook("dynamic_tree", 8), np.float32)


def _stochastic(x: jax.Array, uniform: jax.Array) -> jax.Array:
  upper = jnp.clip(code_search.sorted_search(TABLE, x, "right"), 1, TABLE.size - 1)
  low, high = jnp.take(jnp.asarray(TABLE), upper - 1), jnp.take(jnp.asarray(TABLE), upper)
  p_upper = jnp.clip((x - low) / (high - low), 0.0, 1.0)
  return jnp.where(uniform < p_upper, upper, upper - 1).astype(jnp.uint8)


def _scale_argmax(blocks: jax.Array) -> jax.Array:
  largest = jnp.argmax(jnp.abs(blocks), axis=-1)[..., None]
  return jnp.take_along_axis(blocks, largest, axis=-1)[..., 0]


def _scale_max_min(blocks: jax.Array) -> jax.Array:
  highest, lowest = jnp.max(blocks, axis=-1), jnp.min(blocks, axis=-1)
  return jnp.where(highest >= -lowest, highest, lowest)


def variants() -> dict:
  """``{(part, alternative): fn(x, count)}``."""
  key = lambda count: ms.rounding_key(count, 8, "first")  # noqa: E731
  return {
      ("search", "jnp.searchsorted (binary)"): lambda x, c: jnp.searchsorted(
          jnp.asarray(TABLE), x, side="right", method="scan_unrolled"),
      ("search", "sorted_search (lookup)"): lambda x, c: code_search.sorted_search(TABLE, x, "right"),
      ("stochastic rounding", "jax.random.uniform"): lambda x, c: _stochastic(
          x, jax.random.uniform(key(c), x.shape)),
      ("stochastic rounding", "rounding_uniform (hash)"): lambda x, c: _stochastic(
          x, ms.rounding_uniform(key(c), x.shape)),
      ("block scale", "argmax + gather"): lambda x, c: _scale_argmax(x.reshape(x.shape[:-1] + (-1, 256))),
      ("block scale", "max and min"): lambda x, c: _scale_max_min(x.reshape(x.shape[:-1] + (-1, 256))),
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", type=int, default=1 << 20)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / "moment_store_parts.json")
  args = parser.parse_args(argv)
  x = jax.random.uniform(jax.random.key(0), (args.size // 1024, 1024), minval=-1.0, maxval=1.0)
  count = jnp.int32(3)
  compiled = {name: jax.jit(fn).lower(x, count).compile() for name, fn in variants().items()}
  for fn in compiled.values():
    jax.block_until_ready(fn(x, count))
  samples = {name: [] for name in compiled}
  for _ in range(args.repeats):  # interleaved, so machine noise hits every variant alike
    for name, fn in compiled.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(x, count))
      samples[name].append(time.perf_counter() - t0)
  rows = [{"part": part, "alternative": alt, "median_ms": float(np.median(s) * 1e3),
           "min_ms": float(np.min(s) * 1e3)} for (part, alt), s in samples.items()]
  print(f"{'part':20s} {'alternative':28s} {'median ms':>10s}   ({args.size} values, {jax.default_backend()})")
  for row in rows:
    print(f"{row['part']:20s} {row['alternative']:28s} {row['median_ms']:10.2f}")
  args.out.write_text(json.dumps({"size": args.size, "repeats": args.repeats, "backend": jax.default_backend(),
                                  "cpu_count": os.cpu_count(), "rows": rows}, indent=1))
  print(f"wrote {args.out}")
  return {"rows": rows}


if __name__ == "__main__":
  main()
