"""Research: where 4-bit Shampoo's quantized basis hurts on ill-conditioned statistics (existing options only).

``adamw_shampoo4`` (statistics every 10, roots every 50 steps, ``min_quant_order=16``) on problems of
``benchmarks/illcond.py``, varying one storage/refresh option at a time against the fp32 and 4-bit rows:
``bits=8``; ``store_root=False`` (no quantized root: the root is rebuilt from the stored eigenpairs at
every step, so only the quantized eigenvectors enter); ``bjorck_steps=(0, 0)`` / ``(2, 8)``;
``refresh_method="eigh"`` (the statistic re-decomposed exactly from the dequantized eigen-pair);
``quant_block=16``. Mean over seeds of suboptimality at the best learning rate and the largest stable
learning rate:

  python benchmarks/shampoo4_illcond_probe.py [--problems ls_logunif_1e6 ls_power_1e8] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import optax_shampoo4 as s4  # noqa: E402
from benchmarks import illcond  # noqa: E402

_BASE = dict(weight_decay=0.0, stats_every=10, root_every=50, min_quant_order=16)
VARIANTS = {
    "fp32": dict(state_format="fp32"),
    "4bit": dict(),
    "8bit": dict(bits=8),
    "4bit_store_root_false": dict(store_root=False),
    "4bit_bjorck_0_0": dict(bjorck_steps=(0, 0)),
    "4bit_bjorck_2_8": dict(bjorck_steps=(2, 8)),
    "4bit_refresh_eigh": dict(refresh_method="eigh"),
    "4bit_block16": dict(quant_block=16),
}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--problems", nargs="+", default=["ls_logunif_1e6", "ls_power_1e8"])
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--lrs", nargs="+", type=float, default=[0.0316, 0.1, 0.316, 1.0, 3.16])
  parser.add_argument("--out", default=str(_ROOT / "benchmarks" / "results" / "shampoo4_illcond_probe.json"))
  args = parser.parse_args(argv)
  illcond.BASE_LRS = tuple(sorted(args.lrs))
  results = {}
  for name in args.problems:
    build, loss = illcond.PROBLEMS[name]
    problems = [build(seed) for seed in args.seeds]
    summaries = {}
    for variant in args.variants:
      opt = s4.adamw_shampoo4(1.0, **_BASE, **VARIANTS[variant])
      summaries[variant] = illcond.summarize(illcond.sweep(illcond.make_trainer(opt, loss, args.steps), problems, loss))
    ref = summaries.get("fp32", {}).get("best_mean")
    print(f"\n{name} (f - f*; ratio to fp32 at the best lr; mean per lr; largest stable lr)")
    for variant, s in summaries.items():
      sweep = " ".join(f"{lr:.2g}:{m:.3g}" for lr, m in zip(s["lrs"], s["means"]))
      ratio = s["best_mean"] / ref if ref else float("nan")
      print(f"  {variant:<22} {s['best_mean']:.4g} @ {s['best_lr']:.2g} x{ratio:.3g} stable<={s['largest_stable_lr']}"
            f"  [{sweep}]")
    results[name] = summaries
    pathlib.Path(args.out).write_text(json.dumps({"steps": args.steps, "seeds": args.seeds, "problems": results},
                                                 indent=1, default=float))
  return results


if __name__ == "__main__":
  main()
