"""Optimizer-state bytes by part, measured with ``jax.eval_shape`` (no allocation).

Run:  python benchmarks/memory.py [--models gpt2_124m llama_7b ...] [--max-order paper|N]
                                  [--out benchmarks/results/memory.json] [--png ...memory.png]

For every model in ``benchmarks/model_shapes.py`` (all by default) prints one
table of five optimizers (AdamW; AdamW + 32-bit, naive 4-bit, 4-bit (ours) and
8-bit (ours) Shampoo), with the state size relative to AdamW and to
AdamW + 32-bit Shampoo, and the preconditioner compression against 32-bit
Shampoo. The paper's estimate of that compression is 32 / 4.5 ≈ 7.1x (4-bit
codes plus one fp32 scale per 64 elements); it is compared, and the LLaMA2-7B
numbers with the paper's Table 13, in a note at the end. Writes the numbers to
JSON and a bar chart to PNG.

A second, separate table per model gives the preconditioner alone
(``scale_by_shampoo4``'s state) at 3, 4 and 8 bits for the ``eigen`` and
``naive`` formats, in MiB and in bits per fp32-Shampoo element (codes +
block scales + fp32 eigenvalues / diagonals + fp32 small factors). 3-bit codes
take 3 bytes per 8 elements, so with block 64 the bound is 3 + 0.5 = 3.5 bits
per element (32 / 3.5 ≈ 9.1x), against 4.5 (7.1x) at 4 bits and 8.5 (3.8x)
at 8 bits.

``--max-order paper`` (the default) uses the paper's maximum preconditioner
order per model: 1200, but 10000 for LLaMA-130M and 2048 for LLaMA-7B
(Table 13); ``--max-order N`` uses N for every model (the library default is
1024).

A second table per model crosses the first-order moments' storage
(``moment_bits`` None = fp32, 8, 4; ``optax_shampoo4.moments``) with three
families (AdamW, AdamW / SGDM + 4-bit Shampoo with and without stored inverse
roots (``store_root=False``), 4-bit SOAP), as ratios to ``optax.adamw``'s
whole state; the headline is AdamW + 4-bit Shampoo with 8-bit moments (the
paper's Table 13 pairs 4-bit Shampoo with 8-bit AdamW).
A third table per model covers SOAP (``s4.soap4``, its defaults: max order
1024, dimensions above 10000 not rotated): its factor state in float32 (our
``"fp32"`` format: float32 eigenvectors and eigenvalues), in the SOAP
reference's layout (dense float32 statistic *and* basis per factor, L and Q_L:
twice the eigenvector bytes of the same plan, arithmetic), 8-bit and 4-bit,
and the whole state against AdamW's.

"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import optax_shampoo4 as s4  # noqa: E402
from benchmarks.model_shapes import MODELS, PAPER_MAX_ORDER  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import variants  # noqa: E402  (examples/variants.py: the optimizer names)

# The optimizers of the first table, by their names in examples/variants.py (earlier memory.json files use
# other labels; variants.LEGACY_NAMES maps them).
OPTIMIZERS = ("adamw", "adamw+shampoo32", "adamw+naive4", "adamw+shampoo4", "adamw+shampoo8")
# Families x moment bits (None = fp32 moments), for the moment table; SOAP at its own max order (1024).
FAMILIES = ("adamw", "adamw+shampoo4", "sgdm+shampoo4", "adamw+shampoo4_noroot", "sgdm+shampoo4_noroot", "soap4")
MOMENT_BITS = (None, 8, 4)
FP32 = "adamw+shampoo32"
OURS = "adamw+shampoo4"
PAPER_RATIO = 32 / 4.5  # the paper's "≈ 7x" (App. G)
MIB = 2.0**20

# Paper Table 13 (LLaMA2-7B on C4, one A800 of 81,920 MB, context 256, gradient
# checkpointing, max order 2048): total peak memory (MB) by optimizer and batch.
TABLE13 = {
    "8-bit AdamW, batch 64": 60135,
    "8-bit AdamW, batch 128": 68689,
    "8-bit AdamW, batch 256": "OOM",
    "8-bit AdamW + 32-bit Shampoo, batch 2": "OOM",
    "8-bit AdamW + 4-bit Shampoo, batch 64": 74561,
    "8-bit AdamW + 4-bit Shampoo, batch 128": "OOM",
}


SOAP_OPTIMIZERS = ("adamw", "soap32", "soap8", "soap4")  # SOAP at its defaults (max order 1024)
SOAP_OURS = "soap4"


def make(name: str, max_order: int | None = None, moment_bits: int | None = None):
  """The optimizer ``name`` (examples/variants.py) with ``moment_bits``; Shampoo at ``max_order``.

  Learning rate and weight decay do not change the state's bytes.
  """
  shampoo = {} if max_order is None else {"max_order": max_order}
  return variants.make(variants.with_moment_bits(name, moment_bits), 1e-3, 1e-4, shampoo=shampoo)


def measure_soap(model: str) -> dict:
  """SOAP state bytes by part (``jax.eval_shape``) and the factor-state ratios."""
  params = MODELS[model]()
  states = {name: s4.state_nbytes(jax.eval_shape(make(name).init, params)) for name in SOAP_OPTIMIZERS}
  fp32 = states["soap32"]
  # The reference keeps L and Q_L dense in float32: twice our fp32 eigenvector bytes, no eigenvalues.
  reference_factors = 2 * fp32["dense_factors"]
  ratios = {}
  for name, parts in states.items():
    pre = parts["preconditioner"]
    ratios[name] = {
        "total_vs_adamw": parts["total"] / states["adamw"]["total"],
        "fp32_factors_over_factors": fp32["preconditioner"] / pre if pre else None,
        "reference_factors_over_factors": reference_factors / pre if pre else None,
    }
  return {"states": states, "reference_layout_factor_bytes": reference_factors, "ratios": ratios}


def print_soap_table(model: str, result: dict) -> None:
  states, ratios = result["states"], result["ratios"]
  print(f"\n{model}, SOAP (max order 1024, dims > 10000 not rotated); the SOAP reference's layout "
        f"(dense fp32 L and Q) needs {result['reference_layout_factor_bytes'] / MIB:.1f} MiB of factors")
  print(f"{'optimizer':20s} {'total MiB':>10s} {'factors MiB':>12s} {'moments MiB':>12s} {'vs AdamW':>9s} "
        f"{'fp32/this':>10s} {'ref. layout/this':>17s}")
  for name, parts in states.items():
    r = ratios[name]
    comp = f"{r['fp32_factors_over_factors']:.2f}x" if r["fp32_factors_over_factors"] else "-"
    ref = f"{r['reference_factors_over_factors']:.2f}x" if r["reference_factors_over_factors"] else "-"
    print(f"{name:20s} {parts['total'] / MIB:10.1f} {parts['preconditioner'] / MIB:12.1f} "
          f"{parts['first_order'] / MIB:12.1f} {r['total_vs_adamw']:8.3f}x {comp:>10s} {ref:>17s}")


def measure(model: str, max_order: int) -> dict:
  """State bytes by part for every optimizer on one model's parameter shapes."""
  params = MODELS[model]()
  n_params = int(sum(x.size for x in jax.tree.leaves(params)))
  states = {name: s4.state_nbytes(jax.eval_shape(make(name, max_order).init, params)) for name in OPTIMIZERS}
  adamw, fp32 = states["adamw"]["total"], states[FP32]
  ratios = {}
  for name, parts in states.items():
    pre = parts["preconditioner"]
    ratios[name] = {
        "total_vs_adamw": parts["total"] / adamw,
        "total_vs_fp32_shampoo": parts["total"] / fp32["total"],
        "fp32_precond_over_precond": fp32["preconditioner"] / pre if pre else None,
        "precond_bits_per_fp32_element": 32.0 * pre / fp32["preconditioner"] if pre else None,
    }
  moments = {family: {str(bits): s4.state_nbytes(jax.eval_shape(make(family, max_order, bits).init, params))["total"]
                      / adamw for bits in MOMENT_BITS}
             for family in FAMILIES}
  return {"params": n_params, "max_order": max_order, "states": states, "ratios": ratios,
          "moment_bits_vs_adamw": moments}


def print_moment_table(model: str, result: dict) -> None:
  table = result["moment_bits_vs_adamw"]
  print(f"  state / optax.adamw state, by moment bits ({model}):")
  print(f"  {'family':30s} " + " ".join(f"{'m' + str(b) if b else 'fp32 m':>8s}" for b in MOMENT_BITS))
  for family, row in table.items():
    print(f"  {family:30s} " + " ".join(f"{row[str(b)]:7.3f}x" for b in MOMENT_BITS))


PRECOND_BITS = (3, 4, 8)
PRECOND_FORMATS = ("eigen", "naive")


def measure_precond_bits(model: str, max_order: int) -> dict:
  """Preconditioner bytes by part: fp32 and every (format, bits) in PRECOND_FORMATS x PRECOND_BITS."""
  params = MODELS[model]()

  def nbytes(**kwargs):
    tx = s4.scale_by_shampoo4(max_order=max_order, **kwargs)
    return s4.state_nbytes(jax.eval_shape(tx.init, params))

  out = {"fp32": nbytes(state_format="fp32")}
  for state_format in PRECOND_FORMATS:
    for bits in PRECOND_BITS:
      out[f"{state_format} {bits}-bit"] = nbytes(state_format=state_format, bits=bits)
  return out


def print_precond_bits(model: str, max_order: int, parts_by_config: dict) -> None:
  fp32 = parts_by_config["fp32"]["preconditioner"]
  print(f"\n{model}: Shampoo preconditioner alone by bit width, max_order={max_order}")
  print(f"{'config':14s} {'precond MiB':>12s} {'codes':>9s} {'scales':>8s} {'fp32 rest':>9s} "
        f"{'bits/elem':>9s} {'vs fp32':>8s}")
  for name, parts in parts_by_config.items():
    pre = parts["preconditioner"]
    rest = pre - parts["quantized_codes"] - parts["quantized_scales"]
    print(f"{name:14s} {pre / MIB:12.1f} {parts['quantized_codes'] / MIB:9.1f} "
          f"{parts['quantized_scales'] / MIB:8.1f} {rest / MIB:9.1f} {32.0 * pre / fp32:9.2f} "
          f"{fp32 / pre:7.2f}x")


def print_table(model: str, result: dict) -> None:
  states, ratios = result["states"], result["ratios"]
  print(f"\n{model}: {result['params'] / 1e6:.1f}M parameters, max_order={result['max_order']}, "
        f"fp32 AdamW moments {states['adamw']['first_order'] / MIB:.1f} MiB")
  print(f"{'optimizer':28s} {'total MiB':>10s} {'precond MiB':>12s} {'codes':>9s} {'scales':>8s} "
        f"{'fp32 vec':>8s} {'dense':>9s} {'vs AdamW':>9s} {'vs fp32 Sh.':>11s} {'precond comp.':>13s}")
  for name, parts in states.items():
    r = ratios[name]
    comp = r["fp32_precond_over_precond"]
    comp = f"{comp:.2f}x" if comp else "-"
    vecs = parts["eigenvalues"] + parts["diagonals"]
    print(f"{name:28s} {parts['total'] / MIB:10.1f} {parts['preconditioner'] / MIB:12.1f} "
          f"{parts['quantized_codes'] / MIB:9.1f} {parts['quantized_scales'] / MIB:8.1f} "
          f"{vecs / MIB:8.1f} {parts['dense_factors'] / MIB:9.1f} {r['total_vs_adamw']:8.2f}x "
          f"{r['total_vs_fp32_shampoo']:10.2f}x {comp:>13s}")


def paper_notes(results: dict) -> list[str]:
  """Short comparison with the paper's ≈7x and Table 13."""
  notes = [f"Paper: 4-bit preconditioner ≈ 32/4.5 = {PAPER_RATIO:.2f}x smaller than 32-bit "
           "(4-bit codes + one fp32 absmax per 64 elements; fp32 eigenvalues/diagonals and "
           "fp32 small factors make it slightly less)."]
  comps = {m: r["ratios"][OURS]["fp32_precond_over_precond"] for m, r in results.items()}
  notes.append("Ours, fp32 / 4-bit preconditioner bytes: "
               + ", ".join(f"{m} {c:.2f}x" for m, c in comps.items()) + ".")
  headline = {m: r["moment_bits_vs_adamw"]["adamw+shampoo4"] for m, r in results.items()}
  notes.append("AdamW + 4-bit Shampoo state / optax.adamw state with 8-bit (4-bit) moments: "
               + ", ".join(f"{m} {h['8']:.2f}x ({h['4']:.2f}x)" for m, h in headline.items()) + ".")
  for family in ("adamw+shampoo4_noroot", "soap4"):
    row = {m: r["moment_bits_vs_adamw"][family] for m, r in results.items()}
    notes.append(f"{family} / optax.adamw with 8-bit (4-bit) moments: "
                 + ", ".join(f"{m} {h['8']:.2f}x ({h['4']:.2f}x)" for m, h in row.items()) + ".")
  if "llama_7b" in results:
    r = results["llama_7b"]
    st, n = r["states"], r["params"]
    ours, fp32 = st[OURS]["preconditioner"], st[FP32]["preconditioner"]
    adam8 = r["moment_bits_vs_adamw"]["adamw"]["8"] * st["adamw"]["total"]  # our 8-bit AdamW, measured
    delta = TABLE13["8-bit AdamW + 4-bit Shampoo, batch 64"] - TABLE13["8-bit AdamW, batch 64"]
    notes += [
        f"Table 13 (LLaMA2-7B, max order 2048, A800 81,920 MB): 8-bit AdamW 60,135 MB at batch 64; "
        f"+ 4-bit Shampoo 74,561 MB, i.e. +{delta:,} MB; + 32-bit Shampoo OOM even at batch 2.",
        f"Ours at max_order={r['max_order']}: 4-bit preconditioner {ours / MIB:,.0f} MiB "
        f"({ours / 1e6:,.0f} MB) vs that +{delta:,} MB "
        f"(ratio {ours / MIB / delta:.2f} if Table 13's MB are MiB, as torch.cuda.max_memory_allocated/2**20); "
        f"32-bit preconditioner {fp32 / MIB:,.0f} MiB, which with bf16 weights+grads "
        f"({4 * n / MIB:,.0f} MiB) and 8-bit AdamW ({adam8 / MIB:,.0f} MiB) alone is "
        f"{(fp32 + 4 * n + adam8) / MIB:,.0f} MiB > 81,920: consistent with the OOM.",
        f"The first table pairs Shampoo with fp32 AdamW ({st['adamw']['total'] / MIB:,.0f} MiB); "
        f"with 8-bit moments (moment_bits=8) the whole AdamW + 4-bit Shampoo state is "
        f"{r['moment_bits_vs_adamw']['adamw+shampoo4']['8']:.2f}x fp32 AdamW's.",
    ]
  return notes


def plot(results: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  models = list(results)
  names = list(OPTIMIZERS)
  short = ["AdamW", "+32-bit Sh.", "+naive 4-bit", "+4-bit (ours)", "+8-bit (ours)"]
  colors = ["#777777", "#d62728", "#ff7f0e", "#2ca02c", "#1f77b4"]
  fig = plt.figure(figsize=(14, 9.2))
  grid = fig.add_gridspec(2, 2, width_ratios=[3, 2])
  ax1, ax2, ax3 = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
  x = np.arange(len(models))
  width = 0.8 / len(names)
  for i, (name, label, color) in enumerate(zip(names, short, colors)):
    first = [results[m]["states"][name]["first_order"] / results[m]["states"]["adamw"]["total"]
             for m in models]
    pre = [results[m]["states"][name]["preconditioner"] / results[m]["states"]["adamw"]["total"]
           for m in models]
    pos = x + (i - (len(names) - 1) / 2) * width
    ax1.bar(pos, first, width, color=color, alpha=0.35, edgecolor=color)
    ax1.bar(pos, pre, width, bottom=first, color=color, label=label)
  ax1.set_xticks(x, [f"{m}\n(max {results[m]['max_order']})" for m in models], fontsize=8)
  ax1.set_ylabel("optimizer state / AdamW state")
  ax1.set_title("State bytes (pale: AdamW moments, solid: Shampoo preconditioner)")
  ax1.legend(fontsize=8, ncol=2)
  for i, (name, label, color) in enumerate(zip(names[2:], short[2:], colors[2:])):
    comp = [results[m]["ratios"][name]["fp32_precond_over_precond"] for m in models]
    ax2.bar(x + (i - 1) * 0.27, comp, 0.27, color=color, label=label)
  ax2.axhline(PAPER_RATIO, color="k", ls="--", lw=1, label="paper 32/4.5 = 7.1x")
  ax2.set_xticks(x, models, fontsize=8, rotation=30)
  ax2.set_ylabel("fp32 preconditioner / this")
  ax2.set_title("Preconditioner compression vs 32-bit Shampoo")
  ax2.set_ylim(0, 9)
  ax2.legend(fontsize=8, ncol=2, loc="upper center")
  bars = [(family, bits) for family in FAMILIES for bits in MOMENT_BITS]
  family_colors = dict(zip(FAMILIES, ["#777777", "#2ca02c", "#9467bd", "#17becf", "#e377c2", "#bcbd22"]))
  width = 0.8 / len(bars)
  for i, (family, bits) in enumerate(bars):
    ratio = [results[m]["moment_bits_vs_adamw"][family][str(bits)] for m in models]
    alpha = {None: 1.0, 8: 0.6, 4: 0.3}[bits]
    ax3.bar(x + (i - (len(bars) - 1) / 2) * width, ratio, width, color=family_colors[family], alpha=alpha,
            label=f"{family}, {'fp32' if bits is None else f'{bits}-bit'} moments")
  ax3.axhline(1.0, color="k", lw=1)
  ax3.axhline(0.6, color="k", ls="--", lw=1)
  ax3.axhline(0.45, color="k", ls=":", lw=1)
  ax3.set_xticks(x, models, fontsize=8)
  ax3.set_ylabel("optimizer state / AdamW state")
  ax3.set_title("Quantized first-order moments (moment_bits): whole state vs fp32 AdamW (dashed: 0.6x, dotted: 0.45x)")
  ax3.legend(fontsize=7, ncol=3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  parser.add_argument("--max-order", default="paper",
                      help="'paper' (per-model value from the paper, default) or an int for all models")
  results_dir = pathlib.Path(__file__).parent / "results"
  parser.add_argument("--out", default=str(results_dir / "memory.json"))
  parser.add_argument("--png", default=str(results_dir / "memory.png"), help="'' to skip the plot")
  args = parser.parse_args(argv)
  if args.max_order == "paper":
    orders = {m: PAPER_MAX_ORDER[m] for m in args.models}
  else:
    orders = dict.fromkeys(args.models, int(args.max_order))
  results = {model: measure(model, orders[model]) for model in args.models}
  for model, result in results.items():
    print_table(model, result)
    print_moment_table(model, result)
  precond_bits = {model: measure_precond_bits(model, orders[model]) for model in args.models}
  for model, parts_by_config in precond_bits.items():
    print_precond_bits(model, orders[model], parts_by_config)
    results[model]["soap"] = measure_soap(model)
    print_soap_table(model, results[model]["soap"])
  notes = paper_notes(results)
  print("\nNotes:")
  for note in notes:
    print(f"- {note}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"models": results, "precond_by_bits": precond_bits, "table13_mb": TABLE13,
                             "notes": notes}, indent=2))
  print(f"\nwrote {out}")
  if args.png:
    plot(results, pathlib.Path(args.png))
    print(f"wrote {args.png}")
  return results


if __name__ == "__main__":
  main()
