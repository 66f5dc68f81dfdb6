r"""Ill-conditioned problems: how close each optimizer gets to the optimum, over a learning-rate sweep.

Problems (all full batch, dims <= 64, float32 training, metrics in float64):

* ``ls_power_<k>`` / ``ls_logunif_<k>``: least squares :math:`\frac{1}{2n}\|XW - Y\|^2`,
  :math:`X` 128x64 with the eigenvalues of :math:`X^\top X/n` a power law
  :math:`\lambda_i \propto i^{-\alpha}` or log-uniform in :math:`[1/\kappa, 1]`,
  condition number :math:`\kappa` = 1e2, 1e4, 1e6, 1e8; :math:`W` 64x16, :math:`f^*` by float64 lstsq.
* ``logreg_cancer`` / ``logreg_wine``: softmax regression on the *unscaled* features of
  scikit-learn's breast-cancer (30 features, 2 classes) / wine (13 features, 3 classes) data, plus
  :math:`10^{-4}\|W\|^2/2`; :math:`f^*` by a float64 Newton solve. The seed draws 80 % of the rows.
* ``deeplinear``: a 64-32-32-16 linear network on ``ls_power_1e4``'s data; it can represent any
  64x16 map, so :math:`f^*` is that problem's least-squares optimum.
* ``mlp``: a tanh MLP 64-64-16 fitting a random tanh teacher on power-law inputs (:math:`\kappa` = 1e4);
  the metric is the final loss (no known optimum).

Metric: suboptimality :math:`f - f^*` of the final iterate (convex problems and ``deeplinear``), final
loss for ``mlp``. Each row is swept over learning rates (half-decade grid, extended at a best on the edge
and upwards until a learning rate is unstable), 3 seeds each; a run is unstable when its final loss is
not finite or exceeds its initial loss, or the loss rose above 10x the initial loss on the way. Each (problem, row) is compiled once (``lax.scan`` over steps,
the learning rate a traced argument multiplying the update of an optimizer built with learning rate 1).

Rows: AdamW; ``adamw_shampoo4`` fp32 / 4-bit (statistics every 10, roots every 50 steps) and, at the 4-bit
layout's bytes, ``shampoo4_eigvals`` (``bits=8, store_root="eigvals"``: an 8-bit basis, no root matrix, the
roots formed at every step with the eigenvalues of the last root update) and ``shampoo4_eigvals_head`` (the
same with the 1/16 rows of the largest eigenvalues in 16 bits); the authors'
SOAP in dense float32 (``benchmarks/soap_reference.py``); ``soap4`` fp32 / 8-bit / 4-bit; and
``distributed_shampoo4`` fp32 / 4-bit (statistics every step, roots every 10 steps: Meta's schedule).
Weight decay is 0 everywhere (it would change the optimum). Quantized rows use ``min_quant_order=16``
so that these small factors are quantized as a large layer's would be (the default, 64, would keep
most of them in float32).

  python benchmarks/illcond.py [--problems ls_power_1e4 mlp] [--rows adamw soap_ref] [--seeds 0 1 2]
      [--steps 300] [--precision highest] [--out benchmarks/results/illcond.json] [--merge]

Prints one table per problem and writes the JSON and a PNG next to it. With ``--merge`` the rows run
replace those rows in the existing JSON (other rows and problems kept; the rerun rows are listed under
``notes.rerun``), and the table and PNG show the merged results. ``--headline JSON`` prints the README's
table of ratios (4-bit SOAP / reference SOAP, 4-bit / fp32 Distributed Shampoo, 4-bit / 32-bit Shampoo).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import optax_shampoo4 as s4  # noqa: E402
from benchmarks.soap_reference import soap_reference  # noqa: E402

BASE_LRS = tuple(10.0 ** (e / 2) for e in range(-8, 1))  # 1e-4 ... 1, half decades
MAX_EXTENSIONS = 3
L2_LOGREG = 1e-4


@dataclasses.dataclass
class Problem:
  params0: dict
  data: dict
  fstar: float | None


# ------------------------------------------------------------------ losses (xp = numpy for float64, jnp for training)


def _ls_loss(params, data, xp):
  r = data["x"] @ params["w"] - data["y"]
  return 0.5 * xp.sum(r * r) / data["x"].shape[0]


def _logreg_loss(params, data, xp):
  logits = data["x"] @ params["w"]
  top = xp.max(logits, axis=1, keepdims=True)
  lse = top[:, 0] + xp.log(xp.sum(xp.exp(logits - top), axis=1))
  picked = xp.sum(logits * data["onehot"], axis=1)
  return xp.mean(lse - picked) + 0.5 * L2_LOGREG * xp.sum(params["w"] ** 2)


def _deeplinear_loss(params, data, xp):
  h = data["x"] @ params["w1"] @ params["w2"] @ params["w3"]
  r = h - data["y"]
  return 0.5 * xp.sum(r * r) / data["x"].shape[0]


def _mlp_loss(params, data, xp):
  h = xp.tanh(data["x"] @ params["w1"] + params["b1"])
  r = h @ params["w2"] + params["b2"] - data["y"]
  return 0.5 * xp.sum(r * r) / data["x"].shape[0]


# ------------------------------------------------------------------ problem builders


def _spectrum(kind: str, cond: float, d: int, rng) -> np.ndarray:
  if kind == "power":
    return np.arange(1, d + 1) ** (-math.log(cond) / math.log(d))
  lam = 10.0 ** rng.uniform(-math.log10(cond), 0.0, size=d)
  lam[0], lam[-1] = 1.0, 1.0 / cond
  return np.sort(lam)[::-1]


def _features(kind: str, cond: float, rng, n: int = 128, d: int = 64) -> np.ndarray:
  u, _ = np.linalg.qr(rng.normal(size=(n, d)))
  v, _ = np.linalg.qr(rng.normal(size=(d, d)))
  return math.sqrt(n) * (u * np.sqrt(_spectrum(kind, cond, d, rng))) @ v.T


def _ls_data(kind, cond, seed):
  rng = np.random.default_rng(seed)
  x = _features(kind, cond, rng)
  y = x @ rng.normal(size=(64, 16)) + 0.01 * rng.normal(size=(x.shape[0], 16))
  w, *_ = np.linalg.lstsq(x, y, rcond=None)
  return {"x": x, "y": y}, float(_ls_loss({"w": w}, {"x": x, "y": y}, np))


def make_ls(kind: str, cond: float) -> Callable[[int], Problem]:
  def build(seed):
    data, fstar = _ls_data(kind, cond, seed)
    return Problem({"w": np.zeros((64, 16))}, data, fstar)
  return build


def _newton_logreg(x: np.ndarray, onehot: np.ndarray, iters: int = 100) -> float:
  """Float64 Newton with backtracking on the L2-regularized softmax loss; returns f*."""
  d, k = x.shape[1], onehot.shape[1]
  w = np.zeros((d, k))
  data = {"x": x, "onehot": onehot}
  loss = lambda w: float(_logreg_loss({"w": w}, data, np))  # noqa: E731
  for _ in range(iters):
    logits = x @ w
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = x.T @ (p - onehot) / len(x) + L2_LOGREG * w
    hess = np.zeros((d * k, d * k))
    for i in range(k):
      for j in range(k):
        weight = p[:, i] * ((i == j) - p[:, j])
        hess[i::k, j::k] = (x.T * weight) @ x / len(x)
    hess += L2_LOGREG * np.eye(d * k)
    step = np.linalg.solve(hess, grad.reshape(-1)).reshape(d, k)
    t, f0 = 1.0, loss(w)
    while loss(w - t * step) > f0 - 0.25 * t * np.sum(grad * step) and t > 1e-12:
      t /= 2
    w = w - t * step
    if np.abs(grad).max() < 1e-13:
      break
  return loss(w)


def float32_floor(kind: str, cond: float, seed: int, steps: int = 300) -> float:
  r"""The suboptimality a float32 iteration holds on a least-squares problem: Newton steps
  :math:`W \leftarrow W - \tfrac12 H^{-1}\nabla f` computed in float32 on the float32 data, started at the
  optimum of that data rounded to float32, evaluated like the rows (float64 loss on the float64 data).
  Below about 10x this, ratios between rows compare float32 rounding, not optimizers."""
  data, fstar = _ls_data(kind, cond, seed)
  x64, y64 = (data[k].astype(np.float32).astype(np.float64) for k in ("x", "y"))
  w, *_ = np.linalg.lstsq(x64, y64, rcond=None)
  x, y = jnp.asarray(x64, jnp.float32), jnp.asarray(y64, jnp.float32)
  h_inv = jnp.asarray(np.linalg.inv(x64.T @ x64 / len(x64)), jnp.float32)

  def newton(w, _):
    return w - 0.5 * (h_inv @ (x.T @ (x @ w - y) / x.shape[0])), None

  final = jax.lax.scan(newton, jnp.asarray(w, jnp.float32), None, length=steps)[0]
  return float(_ls_loss({"w": np.asarray(final, np.float64)}, data, np)) - fstar


def add_floors(payload: dict) -> dict:
  """``payload`` with ``float32_floor`` (per seed, :func:`float32_floor`) on each least-squares problem."""
  for name, problem in payload["problems"].items():
    if name.startswith("ls_"):
      _, kind, exponent = name.split("_")
      problem["float32_floor"] = [float32_floor(kind, float(exponent), s)
                                  for s in payload["seeds"]]
  return payload


def make_logreg(name: str) -> Callable[[int], Problem]:
  from sklearn import datasets

  def build(seed):
    bunch = datasets.load_breast_cancer() if name == "cancer" else datasets.load_wine()
    rng = np.random.default_rng(seed)
    rows = rng.permutation(len(bunch.target))[: int(0.8 * len(bunch.target))]
    x = bunch.data[rows].astype(np.float64)
    onehot = np.eye(bunch.target.max() + 1)[bunch.target[rows]]
    data = {"x": x, "onehot": onehot}
    return Problem({"w": np.zeros((x.shape[1], onehot.shape[1]))}, data, _newton_logreg(x, onehot))
  return build


def make_deeplinear(seed):
  data, fstar = _ls_data("power", 1e4, seed)
  rng = np.random.default_rng(seed + 1000)
  shapes = [(64, 32), (32, 32), (32, 16)]
  params = {f"w{i + 1}": rng.normal(size=s) / math.sqrt(s[0]) for i, s in enumerate(shapes)}
  return Problem(params, data, fstar)


def make_mlp(seed):
  rng = np.random.default_rng(seed)
  x = _features("power", 1e4, rng)
  teacher = np.tanh(x @ rng.normal(size=(64, 64)) / 8) @ rng.normal(size=(64, 16))
  data = {"x": x, "y": teacher + 0.01 * rng.normal(size=teacher.shape)}
  params = {"w1": rng.normal(size=(64, 64)) / 8, "b1": np.zeros(64), "w2": rng.normal(size=(64, 16)) / 8,
            "b2": np.zeros(16)}
  return Problem(params, data, None)


PROBLEMS: dict[str, tuple[Callable[[int], Problem], Callable]] = {}
for _kind in ("power", "logunif"):
  for _exp in (2, 4, 6, 8):
    PROBLEMS[f"ls_{_kind}_1e{_exp}"] = (make_ls(_kind, 10.0**_exp), _ls_loss)
PROBLEMS["logreg_cancer"] = (make_logreg("cancer"), _logreg_loss)
PROBLEMS["logreg_wine"] = (make_logreg("wine"), _logreg_loss)
PROBLEMS["deeplinear"] = (make_deeplinear, _deeplinear_loss)
PROBLEMS["mlp"] = (make_mlp, _mlp_loss)


# ------------------------------------------------------------------ optimizers (learning rate 1; the sweep scales)

_SHAMPOO = dict(weight_decay=0.0, stats_every=10, root_every=50)
_DS = dict(stats_every=1, root_every=10)
_QUANT = dict(min_quant_order=16)
_EIGVALS_HEAD = dict(bits=8, store_root="eigvals", head_fraction=1 / 16, head_bits=16, tail_rectify="qr")

ROWS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": lambda: optax.adamw(1.0, weight_decay=0.0),
    "shampoo32": lambda **kw: s4.adamw_shampoo4(1.0, state_format="fp32", **_SHAMPOO, **kw),
    "shampoo4": lambda **kw: s4.adamw_shampoo4(1.0, **_SHAMPOO, **_QUANT, **kw),
    "soap_ref": lambda: soap_reference(1.0, weight_decay=0.0),
    "soap4_fp32": lambda **kw: s4.soap4(1.0, weight_decay=0.0, state_format="fp32", **kw),
    "soap4_8bit": lambda **kw: s4.soap4(1.0, weight_decay=0.0, bits=8, **_QUANT, **kw),
    "soap4_4bit": lambda **kw: s4.soap4(1.0, weight_decay=0.0, **_QUANT, **kw),
    "ds_fp32": lambda **kw: s4.distributed_shampoo4(1.0, state_format="fp32", **_DS, **kw),
    "ds_4bit": lambda **kw: s4.distributed_shampoo4(1.0, **_DS, **_QUANT, **kw),
    "shampoo8": lambda **kw: s4.adamw_shampoo4(1.0, bits=8, **_SHAMPOO, **_QUANT, **kw),
    "ds_8bit": lambda **kw: s4.distributed_shampoo4(1.0, bits=8, **_DS, **_QUANT, **kw),
    "ds_4bit_nofloor": lambda **kw: s4.distributed_shampoo4(1.0, quant_damping=0.0, **_DS, **_QUANT, **kw),
    # The paper layout's bytes spent differently: an 8-bit basis and, per factor, the eigenvalues of the last
    # root update in place of the 4-bit root (store_root="eigvals").
    "shampoo4_eigvals": lambda **kw: s4.adamw_shampoo4(1.0, bits=8, store_root="eigvals", **_SHAMPOO, **_QUANT,
                                                       **kw),
    # The same with the 1/16 rows of the largest eigenvalues in 16 bits (Gram-Schmidt tail): exactly the paper
    # layout's bytes.
    "shampoo4_eigvals_head": lambda **kw: s4.adamw_shampoo4(1.0, **_EIGVALS_HEAD, **_SHAMPOO, **_QUANT, **kw),
    # 4-bit SOAP's bytes with more 8-bit rows (a 16-bit head of 1/16, then 5/16 in 8 bits), and with more bytes (a
    # 16-bit head of 1/8, then 1/4 in 8 bits).
    "soap4_h16m516": lambda **kw: s4.soap4(1.0, weight_decay=0.0, head_fraction=1 / 16, mid_fraction=5 / 16,
                                           **_QUANT, **kw),
    "soap4_h8m4": lambda **kw: s4.soap4(1.0, weight_decay=0.0, head_fraction=1 / 8, mid_fraction=1 / 4, **_QUANT,
                                        **kw),
}
# Rows run by default (the 8-bit ones, the 4-bit DS without its damping floor and SOAP's other tier layouts on request).
DEFAULT_ROWS = [name for name in ROWS
                if name not in ("shampoo8", "ds_8bit", "ds_4bit_nofloor", "soap4_h16m516", "soap4_h8m4")]
NO_PRECISION = ("adamw", "soap_ref")  # rows without the library's precision= option


def make_row(row: str, precision: str = "highest") -> optax.GradientTransformation:
  """The optimizer of a row; ``precision``: of the library rows' every-step products (others: always float32)."""
  if row in NO_PRECISION:
    return ROWS[row]()
  return ROWS[row](precision=precision)


def make_trainer(opt: optax.GradientTransformation, loss: Callable, steps: int):
  """A jitted ``(params0, data, lr) -> (final params, losses[steps])``."""
  loss32 = lambda p, d: loss(p, d, jnp)  # noqa: E731

  def train(params, data, lr):
    state = opt.init(params)

    def body(carry, _):
      params, state = carry
      value, grads = jax.value_and_grad(loss32)(params, data)
      updates, state = opt.update(grads, state, params)
      params = jax.tree.map(lambda p, u: p + lr * u, params, updates)
      return (params, state), value

    (params, _), losses = jax.lax.scan(body, (params, state), None, length=steps)
    return params, losses

  return jax.jit(train)


def run_one(trainer, problem: Problem, loss: Callable, lr: float) -> dict[str, Any]:
  to32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)  # noqa: E731
  params, losses = trainer(to32(problem.params0), to32(problem.data), jnp.float32(lr))
  final = {k: np.asarray(v, np.float64) for k, v in params.items()}
  with np.errstate(all="ignore"):
    f = float(loss(final, problem.data, np))
    f0 = float(loss(problem.params0, problem.data, np))
  curve = np.asarray(losses, np.float64)
  stable = bool(np.isfinite(f) and f <= f0 and np.all(np.isfinite(curve)) and curve.max() <= 10 * f0)
  metric = (f - problem.fstar if problem.fstar is not None else f) if stable else math.inf
  return {"lr": lr, "metric": metric, "final_loss": f, "stable": stable}


def sweep(trainer, problems: list[Problem], loss: Callable) -> list[dict]:
  """Runs the base grid, then extends it below a best at the bottom and above until unstable."""
  results: dict[float, list] = {}

  def run_lr(lr):
    if lr not in results:
      results[lr] = [run_one(trainer, p, loss, lr) for p in problems]

  def mean_metric(lr):
    return float(np.mean([r["metric"] for r in results[lr]]))

  for lr in BASE_LRS:
    run_lr(lr)
  for _ in range(MAX_EXTENSIONS):
    lrs = sorted(results)
    best = min(lrs, key=mean_metric)
    top_stable = all(r["stable"] for r in results[lrs[-1]])
    if best == lrs[0]:
      run_lr(lrs[0] / math.sqrt(10))
    elif best == lrs[-1] or top_stable:
      run_lr(lrs[-1] * math.sqrt(10))
    else:
      break
  return [{"lr": lr, "runs": results[lr]} for lr in sorted(results)]


def sweep_rows(problem: str, seeds: list[int], steps: int, make: Callable[[str], optax.GradientTransformation],
               rows: list[str]) -> tuple[str, dict[str, dict]]:
  """``(metric name, {row: summary})``: each row's optimizer ``make(row)`` swept on ``problem`` over ``seeds``."""
  build, loss = PROBLEMS[problem]
  problems = [build(seed) for seed in seeds]
  summaries = {row: summarize(sweep(make_trainer(make(row), loss, steps), problems, loss)) for row in rows}
  return ("f - f*" if problems[0].fstar is not None else "final loss"), summaries


def summarize(points: list[dict]) -> dict[str, Any]:
  means = [float(np.mean([r["metric"] for r in p["runs"]])) for p in points]
  best = int(np.argmin(means))
  metrics = [r["metric"] for r in points[best]["runs"]]
  stable_lrs = [p["lr"] for p in points if all(r["stable"] for r in p["runs"])]
  return {"best_lr": points[best]["lr"], "best_mean": means[best], "best_std": float(np.std(metrics)),
          "best_at_edge": best in (0, len(points) - 1), "largest_stable_lr": max(stable_lrs, default=None),
          "lrs": [p["lr"] for p in points], "means": means}


def print_table(problem: str, summaries: dict[str, dict], metric_name: str) -> None:
  ref = summaries.get("soap_ref", {}).get("best_mean")
  print(f"\n{problem}  ({metric_name}, mean over seeds at the best lr)")
  print(f"{'row':<12} {'best lr':>9} {'mean':>11} {'std':>10} {'/soap_ref':>10} {'max stable lr':>14}")
  for row, s in summaries.items():
    ratio = s["best_mean"] / ref if ref else float("nan")
    edge = " (edge)" if s["best_at_edge"] else ""
    stable = "none" if s["largest_stable_lr"] is None else f"{s['largest_stable_lr']:.2g}"
    print(f"{row:<12} {s['best_lr']:>9.2g} {s['best_mean']:>11.4g} {s['best_std']:>10.2g} {ratio:>10.3g} "
          f"{stable:>14}{edge}")


# The README's table: (column title, row, the row it is divided by).
HEADLINE = (("`soap4` 4-bit / ref. SOAP", "soap4_4bit", "soap_ref"), ("`soap4` fp32 / ref. SOAP", "soap4_fp32", "soap_ref"),
            ("DS 4-bit / DS fp32", "ds_4bit", "ds_fp32"), ("Shampoo 4-bit / 32-bit", "shampoo4", "shampoo32"),
            ("Shampoo `store_root=\"eigvals\"` / 32-bit", "shampoo4_eigvals", "shampoo32"),
            ("the same + 16-bit head / 32-bit", "shampoo4_eigvals_head", "shampoo32"))


def headline_table(problems: dict) -> str:
  """Markdown: per problem, the ratios of :data:`HEADLINE` (best-lr means over seeds; — where a row is missing).

  A ratio whose reference is within 10x the problem's float32 floor (``float32_floor``, see ``--floors``)
  is marked ‡: both rows are then at float32 rounding.
  """
  lines = ["| problem (metric) | " + " | ".join(title for title, _, _ in HEADLINE) + " |",
           "|---|" + "---:|" * len(HEADLINE)]
  marked = False
  for name, problem in problems.items():
    summary = problem["summary"]
    floor = float(np.mean(problem["float32_floor"])) if "float32_floor" in problem else 0.0
    cells = []
    for _, row, ref in HEADLINE:
      if row in summary and ref in summary and summary[ref]["best_mean"] > 0:
        at_floor = summary[ref]["best_mean"] < 10 * floor
        marked |= at_floor
        cells.append(f"{summary[row]['best_mean'] / summary[ref]['best_mean']:.2f}×" + (" ‡" if at_floor else ""))
      else:
        cells.append("—")
    lines.append(f"| `{name}` ({problem['metric']}) | " + " | ".join(cells) + " |")
  if marked:
    lines.append("\n‡ the reference row is within 10× the float32 floor (`python benchmarks/illcond.py --floors`).")
  return "\n".join(lines)


def plot(results: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(results)
  cols = min(4, len(names))
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
  for ax, name in zip(axes.flat, names):
    for row, s in results[name]["summary"].items():
      means = np.asarray(s["means"])
      ax.loglog(s["lrs"], np.where(np.isfinite(means), means, np.nan), marker="o", ms=3, label=row)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("learning rate", fontsize=8)
    ax.set_ylabel(results[name]["metric"], fontsize=8)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
  parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS))
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--lrs", nargs="+", type=float, default=None, help="base grid (default: 1e-4..1, half decades)")
  parser.add_argument("--out", default=str(_ROOT / "benchmarks" / "results" / "illcond.json"))
  parser.add_argument("--precision", choices=["highest", "high", "default"], default="highest",
                      help="precision= of the library rows' every-step products (benchmarks/precision.py)")
  parser.add_argument("--merge", action="store_true",
                      help="replace only the rows run in the existing --out JSON (keep the other rows and problems)")
  parser.add_argument("--floors", metavar="JSON", default=None,
                      help="add each least-squares problem's float32 floor to an existing JSON and exit")
  parser.add_argument("--headline", metavar="JSON", default=None,
                      help="print the README's ratio table of an existing JSON and exit (runs nothing)")
  args = parser.parse_args(argv)
  if args.floors:
    path = pathlib.Path(args.floors)
    payload = add_floors(json.loads(path.read_text()))
    path.write_text(json.dumps(payload, indent=1, default=float))
    print({name: p.get("float32_floor") for name, p in payload["problems"].items()})
    return payload
  if args.headline:
    print(headline_table(json.loads(pathlib.Path(args.headline).read_text())["problems"]))
    return {}
  global BASE_LRS
  if args.lrs:
    BASE_LRS = tuple(sorted(args.lrs))
  results = {}
  for name in args.problems:
    build, loss = PROBLEMS[name]
    problems = [build(seed) for seed in args.seeds]
    metric = "f - f*" if problems[0].fstar is not None else "final loss"
    summaries, sweeps = {}, {}
    for row in args.rows:
      start = time.perf_counter()
      trainer = make_trainer(make_row(row, args.precision), loss, args.steps)
      sweeps[row] = sweep(trainer, problems, loss)
      summaries[row] = summarize(sweeps[row])
      summaries[row]["seconds"] = time.perf_counter() - start
    results[name] = {"metric": metric, "fstar": [p.fstar for p in problems], "summary": summaries, "sweeps": sweeps}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"steps": args.steps, "seeds": args.seeds, "precision": args.precision, "problems": results}
    if args.merge and out.exists():
      payload = merge_rows(json.loads(out.read_text()), results, args.rows)
    print_table(name, payload["problems"][name]["summary"], metric)
    out.write_text(json.dumps(payload, indent=1, default=float))
    plot(payload["problems"], out.with_suffix(".png"))
  return results


def merge_rows(previous: dict, results: dict, rows: list[str]) -> dict:
  """``previous`` (an earlier JSON) with the ``rows`` of each problem in ``results`` replaced; rows and
  problems not run are kept as they were, and ``notes.rerun`` lists per problem the rows replaced."""
  merged = dict(previous)
  problems = dict(previous.get("problems", {}))
  notes = dict(previous.get("notes", {}))
  rerun = dict(notes.get("rerun", {}))
  for name, new in results.items():
    old = problems.get(name, {"metric": new["metric"], "fstar": new["fstar"], "summary": {}, "sweeps": {}})
    summary = {**old.get("summary", {}), **{row: new["summary"][row] for row in rows}}
    sweeps = {**old.get("sweeps", {}), **{row: new["sweeps"][row] for row in rows}}
    problems[name] = {**old, "summary": summary, "sweeps": sweeps}
    rerun[name] = sorted(set(rerun.get(name, [])) | set(rows))
  merged["problems"] = problems
  merged["notes"] = {**notes, "rerun": rerun}
  return merged


if __name__ == "__main__":
  main()
