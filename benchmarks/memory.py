"""Optimizer-state bytes by part, measured with ``jax.eval_shape`` (no allocation).

Run:  python benchmarks/memory.py [--models gpt2_124m ...] [--out benchmarks/results/memory.json]

Prints one table per model (AdamW; AdamW + 32-bit, naive 4-bit, 4-bit (ours),
8-bit Shampoo) and writes the numbers to JSON. Ratios compare the Shampoo
preconditioner bytes with the 32-bit format's; the paper's estimate is
32 / 4.5 ≈ 7.1x (4-bit codes + one fp32 scale per 64 elements).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import optax_shampoo4 as s4  # noqa: E402
from benchmarks.model_shapes import MODELS  # noqa: E402

OPTIMIZERS = {
    "adamw": lambda: optax.adamw(1e-3),
    "adamw+shampoo fp32": lambda: s4.adamw_shampoo4(1e-3, state_format="fp32"),
    "adamw+shampoo naive 4-bit": lambda: s4.adamw_shampoo4(1e-3, state_format="naive"),
    "adamw+shampoo 4-bit (ours)": lambda: s4.adamw_shampoo4(1e-3),
    "adamw+shampoo 8-bit (ours)": lambda: s4.adamw_shampoo4(1e-3, bits=8),
}


def measure(model: str) -> dict:
  """State bytes by part for every optimizer on one model's parameter shapes."""
  params = MODELS[model]()
  n_params = sum(x.size for x in jax.tree.leaves(params))
  rows = {name: s4.state_nbytes(jax.eval_shape(make().init, params)) for name, make in OPTIMIZERS.items()}
  return {"params": n_params, "max_order": 1024, "states": rows}


def print_table(model: str, result: dict) -> None:
  mib = 2.0**20
  states = result["states"]
  fp32 = states["adamw+shampoo fp32"]["preconditioner"]
  adamw = states["adamw"]["total"]
  print(f"\n{model}: {result['params'] / 1e6:.1f}M parameters, max_order={result['max_order']}")
  print(f"{'optimizer':30s} {'total MiB':>11s} {'precond MiB':>12s} {'codes MiB':>10s} "
        f"{'scales MiB':>11s} {'vs AdamW':>9s} {'fp32/precond':>13s}")
  for name, parts in states.items():
    pre = parts["preconditioner"]
    ratio = f"{fp32 / pre:.2f}x" if pre else "-"
    print(f"{name:30s} {parts['total'] / mib:11.1f} {pre / mib:12.1f} "
          f"{parts['quantized_codes'] / mib:10.1f} {parts['quantized_scales'] / mib:11.1f} "
          f"{parts['total'] / adamw:8.2f}x {ratio:>13s}")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "memory.json"))
  args = parser.parse_args(argv)
  results = {model: measure(model) for model in args.models}
  for model, result in results.items():
    print_table(model, result)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=2))
  print(f"\nwrote {out.name}")
  return results


if __name__ == "__main__":
  main()
