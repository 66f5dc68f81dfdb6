"""Research: 4-bit Shampoo / Distributed Shampoo with some eigenvectors in 8 bits, largest or smallest eigenvalues.

The quantized eigen-pair's error enters the root through the eigenvectors; the inverse root amplifies the
directions of the *smallest* eigenvalues most. This probe stores a fraction ``head_fraction`` of each
quantized factor's eigenvectors in 8 bits (the rest in 4 bits, rectified to be orthogonal to them: the
split-rows store of :class:`~optax_shampoo4.factors.FactorConfig`), either the leading ones (largest
eigenvalues, the store's order) or the trailing ones (smallest eigenvalues: the refreshed eigenpairs are
stored in ascending order, so the 8-bit head holds them). Patched into the factor settings for the run
(no library option yet); rows as in ``benchmarks/illcond.py``. Also ``distributed_shampoo4`` with
statistics every 10 steps (its default schedule) in fp32 / 4-bit, and with a relative damping
(``epsilon_mode="relative"``) in place of Meta's absolute 1e-12.

  python benchmarks/shampoo4_head_probe.py [--problems ls_logunif_1e6] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import pathlib
import sys

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import optax_shampoo4 as s4  # noqa: E402
from benchmarks import illcond  # noqa: E402
from optax_shampoo4 import factors, options  # noqa: E402

_SHAMPOO = dict(weight_decay=0.0, stats_every=10, root_every=50, min_quant_order=16)
_DS = dict(stats_every=1, root_every=10, min_quant_order=16)
# name -> (alias, options, head fraction, head from the smallest eigenvalues)
VARIANTS = {
    "shampoo32": (s4.adamw_shampoo4, dict(_SHAMPOO, state_format="fp32"), 0.0, False),
    "shampoo4": (s4.adamw_shampoo4, _SHAMPOO, 0.0, False),
    "shampoo4_head_large": (s4.adamw_shampoo4, _SHAMPOO, 0.125, False),
    "shampoo4_head_small": (s4.adamw_shampoo4, _SHAMPOO, 0.125, True),
    "shampoo8": (s4.adamw_shampoo4, dict(_SHAMPOO, bits=8), 0.0, False),
    "ds_fp32": (s4.distributed_shampoo4, dict(_DS, state_format="fp32"), 0.0, False),
    "ds_4bit": (s4.distributed_shampoo4, _DS, 0.0, False),
    "ds_4bit_head_large": (s4.distributed_shampoo4, _DS, 0.125, False),
    "ds_4bit_head_small": (s4.distributed_shampoo4, _DS, 0.125, True),
    "ds_8bit": (s4.distributed_shampoo4, dict(_DS, bits=8), 0.0, False),
    # Fewer re-quantizations of the summed statistic: statistics every 10 steps, fp32 and 4-bit.
    "ds_fp32_stats10": (s4.distributed_shampoo4, dict(_DS, stats_every=10, state_format="fp32"), 0.0, False),
    "ds_4bit_stats10": (s4.distributed_shampoo4, dict(_DS, stats_every=10), 0.0, False),
    # A relative damping floor for the quantized basis (epsilon * lambda_max in place of Meta's 1e-12).
    "ds_4bit_stats10_rel1e-6": (s4.distributed_shampoo4, dict(_DS, stats_every=10, epsilon=1e-6,
                                                               epsilon_mode="relative"), 0.0, False),
    "ds_4bit_stats10_rel1e-8": (s4.distributed_shampoo4, dict(_DS, stats_every=10, epsilon=1e-8,
                                                               epsilon_mode="relative"), 0.0, False),
    "ds_4bit_rel1e-8": (s4.distributed_shampoo4, dict(_DS, epsilon=1e-8, epsilon_mode="relative"), 0.0, False),
    "ds_fp32_rel1e-8": (s4.distributed_shampoo4, dict(_DS, epsilon=1e-8, epsilon_mode="relative",
                                                       state_format="fp32"), 0.0, False),
}


@contextlib.contextmanager
def head_rows(fraction: float, smallest: bool):
  """Patches the factor settings: ``fraction`` of the eigenvectors in 8 bits, optionally the smallest ones."""
  config, refresh = options.ShampooOptions.factor_config, factors.refresh_eigenbasis

  def with_head(self):
    return dataclasses.replace(config(self), head_fraction=fraction)

  def ascending(cfg, stat, cols):
    vectors, values = refresh(cfg, stat, cols)
    return vectors[..., ::-1], values[..., ::-1]

  options.ShampooOptions.factor_config = with_head
  if smallest:
    factors.refresh_eigenbasis = ascending
  try:
    yield
  finally:
    options.ShampooOptions.factor_config, factors.refresh_eigenbasis = config, refresh


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--problems", nargs="+", default=["ls_logunif_1e6"])
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--lrs", nargs="+", type=float, default=[0.01, 0.0316, 0.1, 0.316, 1.0, 3.16])
  parser.add_argument("--out", default=str(_ROOT / "benchmarks" / "results" / "shampoo4_head_probe.json"))
  args = parser.parse_args(argv)
  illcond.BASE_LRS = tuple(sorted(args.lrs))
  results = {}
  for name in args.problems:
    build, loss = illcond.PROBLEMS[name]
    problems = [build(seed) for seed in args.seeds]
    summaries = {}
    for variant in args.variants:
      alias, kwargs, fraction, smallest = VARIANTS[variant]
      with head_rows(fraction, smallest):
        trainer = illcond.make_trainer(alias(1.0, **kwargs), loss, args.steps)
        summaries[variant] = illcond.summarize(illcond.sweep(trainer, problems, loss))
      s = summaries[variant]
      sweep = " ".join(f"{lr:.2g}:{m:.3g}" for lr, m in zip(s["lrs"], s["means"]))
      print(f"{name} {variant:<20} {s['best_mean']:.4g} @ {s['best_lr']:.2g} stable<={s['largest_stable_lr']}"
            f"  [{sweep}]", flush=True)
    results[name] = summaries
    pathlib.Path(args.out).write_text(json.dumps({"steps": args.steps, "seeds": args.seeds, "problems": results},
                                                 indent=1, default=float))
  return results


if __name__ == "__main__":
  main()
