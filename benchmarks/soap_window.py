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
  5 / 2 steps (more gradients sampled, at 2× / 5× the refresh cost);
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
* ``dense``: the reference's dense statistic (``benchmarks/soap_reference.py``).

Problems and metric as ``benchmarks/illcond.py`` (suboptimality or final loss, mean over seeds at the best
learning rate of a sweep, and the whole sweep):

  python benchmarks/soap_window.py --seeds 0 1 2 3 4 5   # mlp, ls_logunif_1e4, logreg_wine: soap_window.json
  python benchmarks/soap_window.py --problems all --seeds 0 1 2 \
      --variants refresh corrected window window_q8 dense --out benchmarks/results/soap_window_all.json
"""

from __future__ import annotations

import argparse
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
VARIANTS = ("refresh", "refresh_f5", "refresh_f2", "corrected", "momentum", "window", "window_head", "window_q8",
            "window_q4", "carried", "carried_q8", "carried_q4", "dense")


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


def scale_by_soap_window(variant: str, b1: float = 0.95, b2: float = 0.95, eps: float = 1e-8,
                         every: int = 10) -> optax.GradientTransformation:
  """SOAP's normalized direction with the statistic kept as ``variant`` says (see the module docstring)."""
  beta, store = b2, carrier_store(variant)
  every = int(variant.split("_f")[1]) if variant.startswith("refresh_f") else every
  variant = "refresh" if variant.startswith("refresh_f") else variant
  beta_f = beta**every

  def init_fn(params):
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    rot = lambda p: p.ndim >= 2  # noqa: E731
    lam = jax.tree.map(lambda p: tuple(jnp.zeros(n) if rot(p) else None for n in p.shape), params)
    off = jax.tree.map(lambda p: tuple(jnp.zeros((n, n)) if rot(p) else None for n in p.shape), params)
    bases = jax.tree.map(lambda p: tuple(jnp.eye(n) if rot(p) else None for n in p.shape), params)
    return WindowState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32), zeros, zeros, lam, off, bases)

  def update_fn(updates, state, params=None):
    del params
    started = state.count > 0
    step = state.step + started.astype(jnp.int32)
    leaves, treedef = jax.tree.flatten(updates)
    flat = treedef.flatten_up_to
    outs = []
    for g, m, v, lam, off, q in zip(leaves, flat(state.mu), flat(state.nu), flat(state.lam), flat(state.off),
                                    flat(state.bases)):
      outs.append(leaf_update(g.astype(jnp.float32), m, v, lam, off, q, step, started))
    cols = [treedef.unflatten(list(c)) for c in zip(*outs)]
    return cols[0], WindowState(state.count + 1, step, *cols[1:])

  def leaf_update(g, m, v, lam, off, q, step, started):
    rotated = project(g, q)
    m_new, v_new = b1 * m + (1 - b1) * rotated, b2 * v + (1 - b2) * rotated**2
    t = jnp.maximum(step, 1).astype(jnp.float32)
    direction = jnp.sqrt(1 - b2**t) / (1 - b1**t) * project_back(m_new / (jnp.sqrt(v_new) + eps), q)
    direction = jnp.where(started, direction, 0.0)
    m_new, v_new = jnp.where(started, m_new, m), jnp.where(started, v_new, v)
    if all(b is None for b in q):
      return direction, m_new, v_new, lam, off, q
    refresh = started & (step % every == 0)
    grams = [None if qk is None else outer_product(rotated, k) for k, qk in enumerate(q)]  # R_k = Q_kᵀ G Gᵀ Q_k
    if variant == "momentum":  # the off-diagonal part from Adam's (bias-corrected) first moment instead
      moment = m_new / (1 - b1**t)
      grams = [None if r is None else jnp.where(started, offdiag(outer_product(moment, k)) + jnp.diag(jnp.diag(r)), r)
               for k, r in enumerate(grams)]
    lam, off, a_rot = fold(lam, off, grams, started)
    new = [first_or_refresh(a, lk, ok, qk, refresh, started) for a, lk, ok, qk in zip(a_rot, lam, off, q)]
    orders = [None if n is None else n[3] for n in new]
    for k, o in enumerate(orders):
      if o is not None:
        v_new = jnp.where(refresh, jnp.take(v_new, o, axis=k), v_new)
    q_new = tuple(None if n is None else n[0] for n in new)
    lam = tuple(None if n is None else n[1] for n in new)
    off = tuple(None if n is None else store(n[2]) for n in new)
    m_new = lax.cond(refresh, lambda: project(project_back(m_new, q), q_new), lambda: m_new)
    return direction, m_new, v_new, lam, off, q_new

  def fold(lam, off, grams, started):
    """Every step's fold; returns ``(lam, off, A in the current basis)`` (A used where a refresh is due)."""
    new_lam, new_off, a_rot = [], [], []
    for lk, ok, r in zip(lam, off, grams):
      if r is None:
        new_lam.append(None), new_off.append(None), a_rot.append(None)
        continue
      if variant == "refresh":
        a = beta_f * jnp.diag(lk) + (1 - beta_f) * r
        lk_new, ok_new = lk, ok
      else:
        lk_new = beta * lk + (1 - beta) * jnp.diag(r)
        if variant in ("corrected", "momentum"):
          ok_new = ok
          weight = 1.0 if variant == "momentum" else 1 - beta_f
          a = jnp.diag(lk_new) + jnp.where(started, weight, 1 - beta) * offdiag(r)
        else:
          ok_new = store(beta * ok + (1 - beta) * offdiag(r))
          if variant == "window_head":  # only the rows and columns of the leading eighth (sorted basis)
            lead = jnp.arange(r.shape[0]) < max(1, r.shape[0] // 8)
            ok_new = jnp.where(lead[:, None] | lead[None, :], ok_new, 0.0)
          a = jnp.diag(lk_new) + ok_new
      new_lam.append(lk_new), new_off.append(ok_new), a_rot.append(a)
    return tuple(new_lam), tuple(new_off), a_rot

  def first_or_refresh(a, lk, ok, qk, refresh, started):
    """``(Q, lam, off, order)`` after this step: eigh at call 1, a sorted power step at a refresh."""
    if a is None:
      return None
    n = a.shape[0]
    order = jnp.argsort(-jnp.diag(a), stable=True)
    p = s4.linalg.orthonormal_basis(a[:, order])  # qr(A_rot[:, o]): Q_new = Q P
    p_first, _ = s4.linalg.eigh_descending(a + 1e-30 * jnp.eye(n))
    p = jnp.where(started, p, p_first)
    b = s4.linalg.matmul(p.T, s4.linalg.matmul(a, p))
    changed = refresh | ~started
    keep_residual = variant in ("carried", "carried_q8", "carried_q4")
    off_after = offdiag(b) if keep_residual else jnp.zeros_like(b)
    return (jnp.where(changed, s4.linalg.matmul(qk, p), qk), jnp.where(changed, jnp.diag(b), lk),
            jnp.where(changed, off_after, ok), order)

  return optax.GradientTransformation(init_fn, update_fn)


def make_opt(variant: str) -> optax.GradientTransformation:
  if variant == "dense":
    return soap_reference(1.0, weight_decay=0.0)
  return optax.chain(scale_by_soap_window(variant), optax.scale(-1.0))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--problems", nargs="+", default=["mlp", "ls_logunif_1e4", "logreg_wine"])
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
    build, loss = illcond.PROBLEMS[name]
    problems = [build(seed) for seed in args.seeds]
    summaries = {}
    for variant in args.variants:
      trainer = illcond.make_trainer(make_opt(variant), loss, args.steps)
      summaries[variant] = illcond.summarize(illcond.sweep(trainer, problems, loss))
    metric = "f - f*" if problems[0].fstar is not None else "final loss"
    ref = summaries.get("dense", {}).get("best_mean")
    print(f"\n{name} ({metric}; ratio to dense at the best lr; mean per lr)", flush=True)
    for variant, s in summaries.items():
      ratio = s["best_mean"] / ref if ref else float("nan")
      sweep = " ".join(f"{lr:.2g}:{m:.3g}" for lr, m in zip(s["lrs"], s["means"]))
      print(f"  {variant:<12} best {s['best_mean']:.4g} ± {s['best_std']:.2g} @ {s['best_lr']:.2g}  "
            f"x{ratio:.3g}   [{sweep}]", flush=True)
    results[name] = {"metric": metric, "summary": summaries}
    pathlib.Path(args.out).write_text(json.dumps({"steps": args.steps, "seeds": args.seeds, "problems": results},
                                                 indent=1, default=float))
  return results


if __name__ == "__main__":
  main()
