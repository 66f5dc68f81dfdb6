r"""Research: which part of SOAP's statistic window the low-memory eigen-pair statistic misses.

A dense float32 SOAP with the authors' semantics (first basis by ``eigh`` at call 1 with no update, Adam in
the basis, every ``f`` = 10 Adam steps: columns sorted by :math:`\mathrm{diag}(Q^\top S Q)`, ``v``
permuted with them, one power step :math:`Q \leftarrow \mathrm{qr}(S Q)`, ``m`` re-projected) whose
statistic is kept in the current basis as its diagonal :math:`\lambda` and (where a variant keeps it) its
off-diagonal part :math:`O`, so that :math:`S = Q(\mathrm{diag}\,\lambda + O)Q^\top`. With
:math:`G'_k = Q_k^\top G_{(k)}`-rotations and :math:`R = Q^\top G G^\top Q` (from the rotated gradient), the
variants form a ladder from the library's eigen-pair statistic to the reference:

* ``refresh``: folded at refresh steps only, :math:`A = \beta^f Q\Lambda Q^\top + (1-\beta^f) GG^\top`
  (the library's ``statistic="refresh"``); ``refresh_f5`` / ``refresh_f2``: the same with a refresh every
  5 / 2 steps (more gradients sampled, at 2× / 5× the refresh cost), ``refresh_f9`` / ``refresh_f11``:
  every 9 / 11 steps (an odd interval samples both phases of a gradient that alternates step to step);
* ``corrected``: :math:`\lambda \leftarrow \beta\lambda + (1-\beta)\mathrm{diag} R` every step (the
  eigenvalue correction in the current basis); the refresh adds the off-diagonal part of its own step's
  :math:`R` with weight :math:`1-\beta^f` (no memory beyond the eigen-pair);
* ``momentum``: ``corrected`` with the off-diagonal part taken from Adam's bias-corrected first moment,
  :math:`\mathrm{offdiag}(\hat m \hat m^\top)` (no memory beyond the eigen-pair);
* ``window``: :math:`O \leftarrow \beta O + (1-\beta)\,\mathrm{offdiag}\,R` every step as well, reset to 0 at
  each refresh (every gradient's off-diagonal part since the last refresh; what one power step leaves
  off the diagonal is dropped, as the eigen-pair statistics drop it); ``window_head``: only the rows and
  columns of :math:`O` of the leading eighth of the (sorted) basis; ``window_q8`` / ``window_q4``:
  :math:`O` stored in 8 bits (dynamic tree) / 4 bits (linear-2), blocks of 64 along rows, re-quantized
  after every fold (a low-bit accumulator: about :math:`n^2` / :math:`n^2/2` bytes per factor, twice /
  as much as the 4-bit eigenvectors);
* ``carried``: ``window`` that carries that residual, :math:`O \leftarrow \mathrm{offdiag}(P^\top
  (\mathrm{diag}\,\lambda + O) P)` at a refresh (:math:`P` the power step in the current basis): the
  reference's statistic in other coordinates (equal up to rounding,
  ``tests/integration/test_soap_window_benchmark.py``); ``carried_q8`` / ``carried_q4``: with :math:`O`
  stored as in ``window_q8`` / ``window_q4``;
* ``dense``: the reference's dense statistic (``benchmarks/soap_reference.py``);
* ``refresh_eigh`` / ``corrected_eigh`` / ``window_eigh``: each refresh an exact eigendecomposition of
  :math:`A` (the eigen-pair then *is* :math:`A`: nothing left off the diagonal to drop) in place of the
  power step (``v`` permuted by the sort of :math:`\mathrm{diag}\,A`, as the power step's).

Problems and metric as ``benchmarks/illcond.py`` (suboptimality or final loss, mean over seeds at the best
learning rate of a sweep, and the whole sweep):

  python benchmarks/soap_window.py --seeds 0 1 2 3 4 5   # mlp, deeplinear, ls_logunif_1e4, logreg_wine
  python benchmarks/soap_window.py --problems all --seeds 0 1 2 \
      --variants refresh corrected window window_q8 dense --out benchmarks/results/soap_window_all.json
  python benchmarks/soap_window.py --seeds 0 1 2 3 4 5 \
      --variants refresh_eigh corrected_eigh window_eigh dense --out benchmarks/results/soap_window_eigh.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import optax_shampoo4 as s4  # noqa: E402
from benchmarks import illcond  # noqa: E402
from benchmarks.soap_reference import outer_product, project, project_back, soap_reference  # noqa: E402

CARRIER_QUANT = {"carried_q8": (8, "dynamic_tree"), "carried_q4": (4, "linear2"),
                 "window_q8": (8, "dynamic_tree"), "window_q4": (4, "linear2")}
VARIANTS = ("refresh", "refresh_f5", "refresh_f2", "refresh_f9", "refresh_f11", "corrected", "momentum",
            "window", "window_head", "window_q8", "window_q4", "carried", "carried_q8", "carried_q4", "dense",
            "refresh_eigh", "corrected_eigh", "window_eigh")


class WindowState(NamedTuple):
  count: jax.Array
  step: jax.Array
  mu: Any
  nu: Any
  lam: Any  # per leaf: tuple of [n] (None where unrotated)
  off: Any  # per leaf: tuple of [n, n] off-diagonal parts in the current basis
  bases: Any


def offdiag(a: jax.Array) -> jax.Array:
  return a - jnp.diag(jnp.diag(a))


def carrier_store(variant: str) -> Callable[[jax.Array], jax.Array]:
  """What the off-diagonal carrier's storage gives back (identity for float32)."""
  if variant not in CARRIER_QUANT:
    return lambda o: o
  bits, mapping = CARRIER_QUANT[variant]
  return lambda o: offdiag(s4.quantization.dequantize(s4.quantization.quantize(o, mapping=mapping, bits=bits,
                                                                                 block=64)))


@dataclasses.dataclass(frozen=True)
class Window:
  """A variant's settings: the statistic kept (``variant``), Adam's constants and the refresh interval."""

  variant: str
  eigh: bool = False  # each refresh an exact eigendecomposition of A (no residual), not one power step
  b1: float = 0.95
  b2: float = 0.95
  eps: float = 1e-8
  every: int = 10

  @property
  def beta_f(self) -> float:
    return self.b2**self.every

  def store(self, off: jax.Array) -> jax.Array:
    return carrier_store(self.variant)(off)


def fold_factor(w: Window, lam: jax.Array, off: jax.Array, r: jax.Array, started: jax.Array) -> tuple:
  """One factor's every-step fold of :math:`R`; returns ``(lam, off, A in the current basis)``."""
  beta = w.b2
  if w.variant == "refresh":
    return lam, off, w.beta_f * jnp.diag(lam) + (1 - w.beta_f) * r
  lam = beta * lam + (1 - beta) * jnp.diag(r)
  if w.variant in ("corrected", "momentum"):
    weight = 1.0 if w.variant == "momentum" else 1 - w.beta_f
    return lam, off, jnp.diag(lam) + jnp.where(started, weight, 1 - beta) * offdiag(r)
  off = w.store(beta * off + (1 - beta) * offdiag(r))
  if w.variant == "window_head":  # only the rows and columns of the leading eighth (sorted basis)
    lead = jnp.arange(r.shape[0]) < max(1, r.shape[0] // 8)
    off = jnp.where(lead[:, None] | lead[None, :], off, 0.0)
  return lam, off, jnp.diag(lam) + off


def first_or_refresh(w: Window, a: jax.Array, lam: jax.Array, off: jax.Array, q: jax.Array,
                     refresh: jax.Array, started: jax.Array) -> tuple:
  """``(Q, lam, off, order)`` after this step: eigh at call 1, a sorted power step at a refresh."""
  n = a.shape[0]
  order = jnp.argsort(-jnp.diag(a), stable=True)
  p = s4.linalg.orthonormal_basis(a[:, order])  # qr(A_rot[:, o]): Q_new = Q P
  p_first, _ = s4.linalg.eigh_descending(a + 1e-30 * jnp.eye(n))
  p = jnp.where(started, p, p_first) if not w.eigh else p_first
  b = s4.linalg.matmul(p.T, s4.linalg.matmul(a, p))
  changed = refresh | ~started
  off_after = offdiag(b) if w.variant.startswith("carried") else jnp.zeros_like(b)
  return (jnp.where(changed, s4.linalg.matmul(q, p), q), jnp.where(changed, jnp.diag(b), lam),
          jnp.where(changed, w.store(off_after), off), order)


def statistic_grams(w: Window, rotated: jax.Array, m: jax.Array, q: tuple, t: jax.Array,
                    started: jax.Array) -> list:
  r"""Per rotated dimension :math:`R_k = Q_k^\top G G^\top Q_k` (``momentum``: its off-diagonal part from
  Adam's bias-corrected first moment, :math:`\hat m \hat m^\top`)."""
  grams = [None if qk is None else outer_product(rotated, k) for k, qk in enumerate(q)]
  if w.variant != "momentum":
    return grams
  moment = m / (1 - w.b1**t)
  mixed = [None if r is None else offdiag(outer_product(moment, k)) + jnp.diag(jnp.diag(r))
           for k, r in enumerate(grams)]
  return [None if r is None else jnp.where(started, x, r) for x, r in zip(mixed, grams)]


def leaf_update(w: Window, g, m, v, lam, off, q, step, started) -> tuple:
  """One leaf's step: ``(direction, m, v, lam, off, bases)``."""
  rotated = project(g, q)
  m_new, v_new = w.b1 * m + (1 - w.b1) * rotated, w.b2 * v + (1 - w.b2) * rotated**2
  t = jnp.maximum(step, 1).astype(jnp.float32)
  direction = jnp.sqrt(1 - w.b2**t) / (1 - w.b1**t) * project_back(m_new / (jnp.sqrt(v_new) + w.eps), q)
  direction = jnp.where(started, direction, 0.0)
  m_new, v_new = jnp.where(started, m_new, m), jnp.where(started, v_new, v)
  if all(b is None for b in q):
    return direction, m_new, v_new, lam, off, q
  refresh = started & (step % w.every == 0)
  new = []
  for k, (lk, ok, r, qk) in enumerate(zip(lam, off, statistic_grams(w, rotated, m_new, q, t, started), q)):
    if r is None:
      new.append((None, None, None))
      continue
    lk, ok, a = fold_factor(w, lk, ok, r, started)
    qk_new, lk, ok, order = first_or_refresh(w, a, lk, ok, qk, refresh, started)
    v_new = jnp.where(refresh, jnp.take(v_new, order, axis=k), v_new)
    new.append((qk_new, lk, ok))
  q_new, lam, off = (tuple(c) for c in zip(*new))
  m_new = lax.cond(refresh, lambda: project(project_back(m_new, q), q_new), lambda: m_new)
  return direction, m_new, v_new, lam, off, q_new


def scale_by_soap_window(variant: str, b1: float = 0.95, b2: float = 0.95, eps: float = 1e-8,
                         every: int = 10) -> optax.GradientTransformation:
  """SOAP's normalized direction with the statistic kept as ``variant`` says (see the module docstring)."""
  eigh = variant.endswith("_eigh")
  variant = variant.removesuffix("_eigh")
  if variant.startswith("refresh_f"):  # refresh_f<k>: the refresh statistic, a refresh every k steps
    variant, every = "refresh", int(variant[len("refresh_f"):])
  w = Window(variant, eigh, b1, b2, eps, every)

  def init_fn(params):
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    def per_dim(make):  # one entry per dimension of a rank >= 2 leaf
      return jax.tree.map(lambda p: tuple(make(n) if p.ndim >= 2 else None for n in p.shape), params)

    return WindowState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32), zeros, zeros,
                       per_dim(jnp.zeros), per_dim(lambda n: jnp.zeros((n, n))), per_dim(jnp.eye))

  def update_fn(updates, state, params=None):
    del params
    started = state.count > 0
    step = state.step + started.astype(jnp.int32)
    leaves, treedef = jax.tree.flatten(updates)
    flat = treedef.flatten_up_to
    outs = [leaf_update(w, g.astype(jnp.float32), *rest, step, started)
            for g, *rest in zip(leaves, flat(state.mu), flat(state.nu), flat(state.lam), flat(state.off),
                                flat(state.bases))]
    cols = [treedef.unflatten(list(c)) for c in zip(*outs)]
    return cols[0], WindowState(state.count + 1, step, *cols[1:])

  return optax.GradientTransformation(init_fn, update_fn)


def make_opt(variant: str) -> optax.GradientTransformation:
  if variant == "dense":
    return soap_reference(1.0, weight_decay=0.0)
  return optax.chain(scale_by_soap_window(variant), optax.scale(-1.0))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--problems", nargs="+", default=["mlp", "deeplinear", "ls_logunif_1e4", "logreg_wine"])
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--lrs", nargs="+", type=float, default=[0.003, 0.01, 0.0316, 0.1, 0.316, 1.0])
  parser.add_argument("--out", default=str(_ROOT / "benchmarks" / "results" / "soap_window.json"))
  args = parser.parse_args(argv)
  if args.problems == ["all"]:
    args.problems = list(illcond.PROBLEMS)
  illcond.BASE_LRS = tuple(sorted(args.lrs))
  results = {}
  for name in args.problems:
    metric, summaries = illcond.sweep_rows(name, args.seeds, args.steps, make_opt, args.variants)
    ref = summaries.get("dense", {}).get("best_mean")
    print(f"\n{name} ({metric}; ratio to dense at the best lr; mean per lr)", flush=True)
    for variant, s in summaries.items():
      ratio = s["best_mean"] / ref if ref else float("nan")
      sweep = " ".join(f"{lr:.2g}:{m:.3g}" for lr, m in zip(s["lrs"], s["means"]))
      print(f"  {variant:<12} best {s['best_mean']:.4g} ± {s['best_std']:.2g} @ {s['best_lr']:.2g}  "
            f"x{ratio:.3g}   [{sweep}]", flush=True)
    results[name] = {"metric": metric, "summary": summaries}
    payload = {"steps": args.steps, "seeds": args.seeds, "problems": results}
    pathlib.Path(args.out).write_text(json.dumps(payload, indent=1, default=float))
  return results


if __name__ == "__main__":
  main()
