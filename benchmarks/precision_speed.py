r"""Optimizer-step time at each ``precision=`` of the every-step products, against ``optax.adamw``.

Times one jitted ``update`` (plain steps: no statistics or root refresh falls in
the timed window) of ``optax.adamw``, ``adamw_shampoo4`` and ``soap4`` at
``precision`` = ``"highest"`` / ``"high"`` / ``"default"`` on GPT-2 124M's
parameter shapes (``benchmarks/model_shapes.py``; ``--tiny``: a small tree for a
CPU smoke run). Prints a table (median ms per step, ratio to AdamW) and writes
JSON. Timings mean something only on an otherwise idle accelerator.

  python benchmarks/precision_speed.py --out benchmarks/results/precision_speed.json
  python benchmarks/precision_speed.py --tiny --out /tmp/precision_speed.json
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

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import optax_shampoo4 as s4  # noqa: E402
from benchmarks import model_shapes  # noqa: E402

PRECISIONS = ("highest", "high", "default")


def optimizers() -> dict[str, optax.GradientTransformation]:
  """Name -> optimizer; refreshes every 1000 steps so that the timed steps are plain steps."""
  txs = {"adamw": optax.adamw(1e-3)}
  for precision in PRECISIONS:
    txs[f"adamw_shampoo4@{precision}"] = s4.adamw_shampoo4(1e-3, stats_every=1000, root_every=1000,
                                                           precision=precision)
    txs[f"soap4@{precision}"] = s4.soap4(1e-3, precondition_every=1000, precision=precision)
  return txs


def tiny_shapes() -> dict:
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
  return {"w": f32(128, 64), "v": f32(64, 64), "b": f32(64)}  # two factor orders (64, 128), both 4-bit


def time_update(tx, shapes: dict, steps: int, warmup: int) -> dict:
  """Median and min seconds of one jitted ``update`` after ``warmup`` calls (the first builds SOAP's bases)."""
  key = jax.random.PRNGKey(0)
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  grads = jax.tree.map(lambda s: 1e-3 * jax.random.normal(key, s.shape, s.dtype), shapes)
  state = tx.init(params)
  update = jax.jit(tx.update)
  start = time.perf_counter()
  for _ in range(warmup):
    out, state = update(grads, state, params)
  jax.block_until_ready(out)
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    out, state = update(grads, state, params)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  return {"median_s": float(np.median(times)), "min_s": float(np.min(times)), "warmup_s": compile_s}


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tiny", action="store_true", help="a small tree instead of GPT-2 124M (CPU smoke run)")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / "precision_speed.json")
  args = parser.parse_args(argv)
  shapes = tiny_shapes() if args.tiny else model_shapes.gpt2_124m()
  results = {}
  for name, tx in optimizers().items():
    results[name] = time_update(tx, shapes, args.steps, args.warmup)
    print(f"{name:<26} {1e3 * results[name]['median_s']:9.2f} ms", flush=True)
  base = results["adamw"]["median_s"]
  print(f"\n{'optimizer':<26} {'median ms':>10} {'min ms':>9} {'/adamw':>8}")
  for name, r in results.items():
    print(f"{name:<26} {1e3 * r['median_s']:>10.2f} {1e3 * r['min_s']:>9.2f} {r['median_s'] / base:>8.2f}")
  payload = {"model": "tiny" if args.tiny else "gpt2_124m", "steps": args.steps, "warmup": args.warmup,
             "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind, "results": results}
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(payload, indent=1))
  print(f"wrote {args.out}")
  return payload


if __name__ == "__main__":
  main()
