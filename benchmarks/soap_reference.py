r"""The SOAP authors' algorithm as a dense float32 optax transformation (for benchmarks, not the library).

Reference semantics (nikhilvyas/SOAP ``soap.py`` at a1e5535; the float64
transcription ``tests/reference_soap.py`` states them step by step and a test
holds this module to it): dense statistics :math:`S_k` folded from *every*
gradient with ``shampoo_beta`` (default ``b2``), the first basis by ``eigh`` at
call 1 with no parameter update, one sort + power step + QR every
``precondition_every`` Adam steps with ``v`` only permuted, ``m`` re-projected
at each basis change, Adam's bias correction on the step size, ``eps`` added to
:math:`\sqrt v`, and decoupled weight decay applied after the step
(:math:`W \leftarrow (W - \eta c N)(1 - \eta\lambda)`).

The optional hooks are research knobs for the low-memory variants measured in
``benchmarks/soap_variants.py``: ``basis_quantizer`` maps each refreshed basis to
what a low-bit store would give back, ``statistic`` chooses how the statistic is
kept (see :func:`scale_by_soap_reference`). Memory: two float32 n×n matrices per
rotated dimension (statistic + basis) next to Adam's moments.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optax_shampoo4 import linalg

HIGHEST = lax.Precision.HIGHEST


class SoapReferenceState(NamedTuple):
  count: jax.Array  # update calls so far
  step: jax.Array  # Adam steps so far (calls - 1 once started)
  mu: Any
  nu: Any
  stats: Any  # per leaf: tuple of [n, n] (or [n] eigenvalues for statistic="eigen") per dimension, None if unrotated
  bases: Any  # per leaf: tuple of [n, n] or None


def _rotated(shape: tuple[int, ...], max_precond_dim: int) -> tuple[bool, ...]:
  if len(shape) < 2:
    return (False,) * len(shape)
  return tuple(n <= max_precond_dim for n in shape)


def project(x: jax.Array, bases: tuple) -> jax.Array:
  """``x`` contracted on each rotated dimension with its basis: :math:`x \\times_k Q_k^\\top`."""
  for q in bases:
    x = jnp.tensordot(x, q, axes=([0], [0]), precision=HIGHEST) if q is not None else jnp.moveaxis(x, 0, -1)
  return x


def project_back(x: jax.Array, bases: tuple) -> jax.Array:
  for q in bases:
    x = jnp.tensordot(x, q, axes=([0], [1]), precision=HIGHEST) if q is not None else jnp.moveaxis(x, 0, -1)
  return x


def outer_product(g: jax.Array, dim: int) -> jax.Array:
  others = [k for k in range(g.ndim) if k != dim]
  return jnp.tensordot(g, g, axes=(others, others), precision=HIGHEST)


def _diag_in_basis(a: jax.Array, q: jax.Array) -> jax.Array:
  return jnp.sum(q * linalg.matmul(a, q), axis=0)


def _identity(q: jax.Array) -> jax.Array:
  return q


def scale_by_soap_reference(
    b1: float = 0.95, b2: float = 0.95, eps: float = 1e-8, shampoo_beta: float | None = None,
    precondition_every: int = 10, max_precond_dim: int = 10000, statistic: str = "dense",
    basis_quantizer: Callable[[jax.Array], jax.Array] = _identity,
    statistic_quantizer: Callable[[jax.Array], jax.Array] = _identity,
) -> optax.GradientTransformation:
  r"""SOAP's normalized direction :math:`c_t N` (no learning rate, no weight decay, no sign).

  ``statistic``: ``"dense"`` (the reference: :math:`S \leftarrow \beta_s S +
  (1-\beta_s) G G^\top` every step), ``"eigen"`` (research: only the
  eigenvalue estimates :math:`\lambda \leftarrow \beta_s \lambda + (1-\beta_s)
  \mathrm{diag}(Q^\top G G^\top Q)` every step, and at a refresh the dense
  :math:`Q \mathrm{diag}(\lambda) Q^\top + (1-\beta_s)\,\mathrm{offdiag}_Q(GG^\top)`
  is rebuilt for the power step) or ``"refresh"`` (the library's current
  ``soap4``: :math:`A = \beta_s Q\Lambda Q^\top + (1-\beta_s) G G^\top` at
  refresh steps only; pass ``shampoo_beta`` per refresh). ``statistic_quantizer``
  maps the dense statistic after each fold to what a low-bit store gives back
  (a low-bit dense accumulator); ``basis_quantizer`` does the same for each new basis.
  """
  beta_s = b2 if shampoo_beta is None else shampoo_beta

  def init_fn(params):
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

    def leaf_stats(p):
      return tuple((jnp.zeros((n,) if statistic != "dense" else (n, n), jnp.float32) if r else None)
                   for n, r in zip(p.shape, _rotated(p.shape, max_precond_dim)))

    def leaf_bases(p):
      return tuple(jnp.eye(n, dtype=jnp.float32) if r else None for n, r in zip(p.shape, _rotated(p.shape, max_precond_dim)))

    stats = jax.tree.map(leaf_stats, params)
    bases = jax.tree.map(leaf_bases, params)
    return SoapReferenceState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32), zeros, zeros, stats, bases)

  def update_fn(updates, state, params=None):
    del params
    count = state.count + 1
    started = state.count > 0
    step = state.step + started.astype(jnp.int32)
    leaves, treedef = jax.tree.flatten(updates)
    flat = lambda tree: treedef.flatten_up_to(tree)  # noqa: E731
    out, mus, nus, stats, bases = [], [], [], [], []
    for g, m, v, s, q in zip(leaves, flat(state.mu), flat(state.nu), flat(state.stats), flat(state.bases)):
      o, m, v, s, q = _leaf_update(g.astype(jnp.float32), m, v, s, q, step, started)
      out.append(o.astype(g.dtype))
      mus.append(m), nus.append(v), stats.append(s), bases.append(q)
    un = treedef.unflatten
    return un(out), SoapReferenceState(count, step, un(mus), un(nus), un(stats), un(bases))

  def _leaf_update(g, m, v, s, q, step, started):
    rotated = project(g, q)
    m_new = b1 * m + (1 - b1) * rotated
    v_new = b2 * v + (1 - b2) * rotated**2
    t = jnp.maximum(step, 1).astype(jnp.float32)
    scale = jnp.sqrt(1 - b2**t) / (1 - b1**t)
    direction = scale * project_back(m_new / (jnp.sqrt(v_new) + eps), q)
    direction = jnp.where(started, direction, 0.0)
    m_new, v_new = jnp.where(started, m_new, m), jnp.where(started, v_new, v)
    if all(b is None for b in q):
      return direction, m_new, v_new, s, q
    s, dense = _fold(s, g, q, step, started)
    refresh = started & (step % precondition_every == 0)
    q_new, v_new = lax.cond(refresh, _qr_refresh, lambda d, q, v: (q, v), dense, q, v_new)
    q_new = lax.cond(started, lambda: q_new, lambda: _first_bases(dense))
    s = _after_refresh(s, dense, q_new, refresh | ~started)
    # The reference maps m back and forth at every step; with an orthonormal basis that is the identity
    # except at a basis change, which is the only place it is done here (a quantized basis is only
    # nearly orthonormal, and the round trip would multiply m by Q^T Q at every step).
    m_new = lax.cond(refresh, lambda: project(project_back(m_new, q), q_new), lambda: m_new)
    return direction, m_new, v_new, s, q_new

  def _fold(s, g, q, step, started):
    """Folds ``g`` into the statistic; returns it and the dense matrices a refresh would use."""
    outers = [outer_product(g, k) if qk is not None else None for k, qk in enumerate(q)]
    if statistic == "dense":
      s = tuple(None if sk is None else statistic_quantizer(sk + (1 - beta_s) * (o - sk)) for sk, o in zip(s, outers))
      return s, s
    dense = []
    for sk, o, qk in zip(s, outers, q):
      if sk is None:
        dense.append(None)
      elif statistic == "eigen":
        rot = linalg.matmul(qk.T, linalg.matmul(o, qk))
        lam = beta_s * sk + (1 - beta_s) * jnp.diag(rot)
        off = rot - jnp.diag(jnp.diag(rot))
        dense.append(linalg.matmul(qk * lam, qk.T) + (1 - beta_s) * linalg.matmul(qk, linalg.matmul(off, qk.T)))
      else:
        dense.append(beta_s * linalg.matmul(qk * sk, qk.T) + (1 - beta_s) * o)
    if statistic == "eigen":
      s = tuple(None if sk is None else beta_s * sk + (1 - beta_s) * _diag_in_basis(o, qk)
                for sk, o, qk in zip(s, outers, q))
    return s, tuple(dense)

  def _after_refresh(s, dense, q, refreshed):
    if statistic == "dense":
      return s
    # Eigen-form statistics: after a basis change the eigenvalues are the Rayleigh quotients in the new basis.
    return tuple(None if sk is None else jnp.where(refreshed, _diag_in_basis(d, qk), sk)
                 for sk, d, qk in zip(s, dense, q))

  def _first_bases(dense):
    out = []
    for d in dense:
      if d is None:
        out.append(None)
        continue
      vecs, _ = linalg.eigh_descending(d + 1e-30 * jnp.eye(d.shape[0]))
      out.append(basis_quantizer(vecs))
    return tuple(out)

  def _qr_refresh(dense, q, v):
    new = []
    for k, (d, qk) in enumerate(zip(dense, q)):
      if d is None:
        new.append(None)
        continue
      order = jnp.argsort(-_diag_in_basis(d, qk), stable=True)
      v = jnp.take(v, order, axis=k)
      new.append(basis_quantizer(linalg.orthonormal_basis(linalg.matmul(d, qk[:, order]))))
    return tuple(new), v

  return optax.GradientTransformation(init_fn, update_fn)


class _DecayState(NamedTuple):
  inner: Any


def soap_reference(learning_rate: float | jax.Array = 3e-3, b1: float = 0.95, b2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 0.01, **kwargs) -> optax.GradientTransformation:
  """The authors' full update, ``-(η c N) - ηλ(W - η c N)`` (decay after the step), as an optax update."""
  inner = scale_by_soap_reference(b1, b2, eps, **kwargs)

  def init_fn(params):
    return _DecayState(inner.init(params))

  def update_fn(updates, state, params):
    direction, inner_state = inner.update(updates, state.inner, params)
    step = jax.tree.map(lambda d: -learning_rate * d, direction)
    if weight_decay:
      started = state.inner.count > 0  # the reference's first call changes nothing
      step = jax.tree.map(lambda s, p: s - started * learning_rate * weight_decay * (p + s), step, params)
    return step, _DecayState(inner_state)

  return optax.GradientTransformation(init_fn, update_fn)
