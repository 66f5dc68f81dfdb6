"""Inverse matrix roots for Shampoo, batched over leading axes, in float32.

From eigenpairs (the paper's Alg. 2), by coupled Newton iteration (Alg. 4),
and Jorge's matmul-only update; the products and decompositions they use are in
:mod:`optax_shampoo4.linalg`.

References:
  Wang et al., `4-bit Shampoo for Memory-Efficient Network Training
  <https://arxiv.org/abs/2405.18144>`_, NeurIPS 2024 (Alg. 2, 4).
  Guo & Higham, `A Schur-Newton method for the matrix p-th root and its inverse
  <https://doi.org/10.1137/050643374>`_, SIAM J. Matrix Anal. Appl. 2006.
  Duvvuri et al. / Singh & Bhatele, `Jorge: Approximate Preconditioning for
  GPU-efficient Second-order Optimization <https://arxiv.org/abs/2310.12298>`_, 2023.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from optax_shampoo4.linalg import matmul, step_matmul, transpose

# Floor on damped eigenvalues, so an all-zero statistic gives a finite root.
_MIN_DAMPED_EIGVAL = 1e-30


def inverse_root_from_eig(
    eigvecs: jax.Array, eigvals: jax.Array, epsilon: jax.Array, p: int = 4, absolute: bool = False,
    precision: str = "highest", relative_floor: jax.typing.ArrayLike = 0.0
) -> jax.Array:
  """Inverse ``p``-th root from eigenpairs, with relative (or absolute) damping.

  .. math:: \\hat A = V \\,\\mathrm{diag}\\big((\\lambda + \\epsilon
     \\max_i \\lambda_i)^{-1/p}\\big)\\, V^\\top

  (with ``absolute=True``, :math:`\\lambda + \\epsilon`: Distributed
  Shampoo's :math:`(A + \\epsilon I)^{-1/p}`, and as there a spectrum with
  :math:`\\lambda_{\\min} < 0` is first shifted by :math:`-\\lambda_{\\min}`).
  Otherwise negative Rayleigh quotients (rounding noise of a PSD matrix)
  count as 0.

  Args:
    eigvecs: ``[..., n, n]``, eigenvectors as columns.
    eigvals: ``[..., n]``.
    epsilon: relative damping ε (array-like, may be traced).
    p: the root (static).
    absolute: ε is added as it is, not scaled by :math:`\\max_i \\lambda_i` (static).
    precision: of the product forming :math:`\\hat A` (:func:`~optax_shampoo4.linalg.step_matmul`):
      ``"highest"`` for a stored root; the step's setting when the root is
      formed at every step (``store_root=False``).
    relative_floor: :math:`\\delta`, added to the damping as
      :math:`\\delta \\max_i \\lambda_i` (whatever ``absolute``); 0 adds
      nothing (may be traced).

  Returns:
    ``[..., n, n]``.
  """
  damped = damped_eigenvalues(eigvals, epsilon, absolute, relative_floor)
  return step_matmul(eigvecs * damped[..., None, :] ** (-1.0 / p), transpose(eigvecs), precision)


def inverse_root_factor_from_eig(
    eigvecs: jax.Array, eigvals: jax.Array, epsilon: jax.Array, p: int = 4, absolute: bool = False,
    relative_floor: jax.typing.ArrayLike = 0.0
) -> jax.Array:
  r"""The factor :math:`W = V\,\mathrm{diag}\big(d^{-1/(2p)}\big)` of the inverse root :math:`\hat A = W W^\top`.

  :math:`d` are the damped eigenvalues of :func:`inverse_root_from_eig`
  (same arguments, same damping), so :math:`W W^\top` is its root. Applying
  :math:`\hat A X = W (W^\top X)` costs :math:`2n^2 m` multiply-adds for an
  ``n×m`` block, where forming :math:`\hat A` first costs :math:`n^3 + n^2 m`:
  the every-step preconditioning of buckets that store no root uses it.

  Returns:
    ``[..., n, n]``, the columns of ``eigvecs`` scaled.
  """
  damped = damped_eigenvalues(eigvals, epsilon, absolute, relative_floor)
  return eigvecs * damped[..., None, :] ** (-0.5 / p)


def damped_eigenvalues(eigvals: jax.Array, epsilon: jax.Array, absolute: bool = False,
                       relative_floor: jax.typing.ArrayLike = 0.0) -> jax.Array:
  r""":math:`\lambda + \epsilon\max_i\lambda_i + \delta\max_i\lambda_i` (or :math:`\lambda + \epsilon + \dots`
  with ``absolute``), as :func:`inverse_root_from_eig` damps them, floored above 0."""
  if absolute:  # Distributed Shampoo's perturbation: a negative spectrum is shifted up to epsilon
    eigvals = eigvals - jnp.minimum(jnp.min(eigvals, axis=-1, keepdims=True), 0.0)
  eigvals = jnp.maximum(eigvals, 0.0)
  top = jnp.max(eigvals, axis=-1, keepdims=True)
  damping = (epsilon if absolute else epsilon * top) + jnp.asarray(relative_floor, jnp.float32) * top
  return jnp.maximum(eigvals + damping, _MIN_DAMPED_EIGVAL)


def power_iteration(a: jax.Array, num_iters: int = 10, tol: float = 1e-6) -> jax.Array:
  """Largest eigenvalue of a symmetric PSD ``[..., n, n]`` by power iteration.

  Starts from a fixed pseudo-random vector in (-1, 1) (deterministic) and stops
  after ``num_iters`` steps or when the Rayleigh quotient changes by at most
  ``tol``.

  Returns:
    ``[...]``, the Rayleigh quotient of the final vector.
  """
  n = a.shape[-1]
  v0 = jax.random.uniform(jax.random.key(0), (n,), jnp.float32, -1.0, 1.0)
  v0 = jnp.broadcast_to(v0, a.shape[:-1])

  def step(v):
    w = matmul(a, v[..., None])[..., 0]
    rayleigh = jnp.sum(v * w, axis=-1)
    norm = jnp.linalg.norm(w, axis=-1, keepdims=True)
    return jnp.where(norm > 0, w / jnp.where(norm > 0, norm, 1.0), v), rayleigh

  def cond(carry):
    i, _, rayleigh, previous = carry
    return (i < num_iters) & jnp.any(jnp.abs(rayleigh - previous) > tol)

  def body(carry):
    i, v, rayleigh, _ = carry
    v, new = step(v)
    return i + 1, v, new, rayleigh

  v = v0 / jnp.linalg.norm(v0, axis=-1, keepdims=True)
  v, rayleigh = step(v)
  inf = jnp.full_like(rayleigh, jnp.inf)
  _, _, rayleigh, _ = lax.while_loop(cond, body, (1, v, rayleigh, inf))
  return rayleigh


def inverse_root_newton(
    a: jax.Array,
    epsilon: jax.Array,
    p: int = 4,
    max_iters: int = 100,
    tol: float = 1e-6,
    absolute: bool = False,
) -> jax.Array:
  """Coupled Newton (Schur–Newton) inverse ``p``-th root with relative damping.

  Computes :math:`(A + \\epsilon \\lambda_{\\max} I)^{-1/p}` for symmetric PSD
  ``a`` with :math:`\\lambda_{\\max}` from :func:`power_iteration`, iterating

  .. math:: T = \\tfrac{p+1}{p} I - \\tfrac1p M, \\quad X \\leftarrow X T,
     \\quad M \\leftarrow T^p M

  from :math:`X = z^{1/p} I`, :math:`M = z A`, :math:`z = (1+p)/(2\\|A\\|_F)`,
  until :math:`\\max|M - I| \\le` ``tol``, the error grows by more than 1.2×
  (the last good ``X`` is kept), or ``max_iters`` steps. The paper's baseline
  runs 10 steps; the small eigenvalues of ``M`` grow only ~2.4× a step, so a
  condition number of 1e6 needs ~16, hence the larger cap (the loop stops
  early once converged). ``1×1`` inputs return 1 as in the reference code.

  Args:
    a: ``[..., n, n]`` symmetric PSD.
    epsilon: relative damping ε (may be traced).
    p: the root (static int >= 1).
    max_iters: iteration cap (static).
    tol: convergence tolerance on ``max|M - I|``.
    absolute: damp with :math:`\\epsilon I` instead of
      :math:`\\epsilon\\lambda_{\\max} I` (static; Distributed Shampoo's
      :math:`(A + \\epsilon I)^{-1/p}`).

  Returns:
    ``[..., n, n]``.
  """
  n = a.shape[-1]
  batch = a.shape[:-2]
  if n == 1:
    return jnp.ones_like(a)
  eye = jnp.eye(n, dtype=a.dtype)
  if absolute:
    a = a + jnp.asarray(epsilon, a.dtype) * eye
  else:
    lam_max = power_iteration(a)
    a = a + (epsilon * jnp.maximum(lam_max, 0.0))[..., None, None] * eye
  frob = jnp.linalg.norm(a, axis=(-2, -1))
  z = (1.0 + p) / (2.0 * jnp.maximum(frob, _MIN_DAMPED_EIGVAL))
  x = (z ** (1.0 / p))[..., None, None] * jnp.broadcast_to(eye, a.shape)
  m = z[..., None, None] * a
  err = jnp.max(jnp.abs(m - eye), axis=(-2, -1))
  alpha = -1.0 / p

  def matrix_power(t: jax.Array) -> jax.Array:
    """``t**p``: the powers ``t**(2**i)`` of ``p``'s set bits, multiplied from the lowest bit up."""
    factors, base, k = [], t, p
    while k:
      if k & 1:
        factors.append(base)
      k >>= 1
      if k:
        base = matmul(base, base)
    return functools.reduce(matmul, factors)

  def cond(carry):
    i, _, _, _, active = carry
    return (i < max_iters) & jnp.any(active)

  def body(carry):
    i, x, m, err, active = carry
    t = (1.0 - alpha) * eye + alpha * m
    x_new = matmul(x, t)
    m_new = matmul(matrix_power(t), m)
    err_new = jnp.max(jnp.abs(m_new - eye), axis=(-2, -1))
    accept = active & (err_new <= 1.2 * err) & jnp.all(jnp.isfinite(x_new), axis=(-2, -1))
    sel = accept[..., None, None]
    x = jnp.where(sel, x_new, x)
    m = jnp.where(sel, m_new, m)
    err = jnp.where(accept, err_new, err)
    active = accept & (err_new > tol)
    return i + 1, x, m, err, active

  active = jnp.broadcast_to(err > tol, batch)
  _, x, _, _, _ = lax.while_loop(cond, body, (0, x, m, err, active))
  return x


def jorge_root_update(
    root: jax.Array,
    gram: jax.Array,
    beta: jax.Array | float | None = None,
    max_step: jax.Array | float = 1.0,
    symmetrize: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """One matmul-only update of an inverse 4th root (Jorge).

  Tracks :math:`\\hat L \\approx L^{-1/4}` of the statistic
  :math:`L \\leftarrow \\beta L + (1-\\beta) G G^\\top` without storing
  :math:`L` or decomposing anything. Writing
  :math:`L_{\\text{new}} = \\beta L (I + \\epsilon X)` with
  :math:`\\epsilon = (1-\\beta)/\\beta` and
  :math:`X = L^{-1} G G^\\top \\approx \\hat L^4 G G^\\top`, the binomial
  series of :math:`(I + \\epsilon X)^{-1/4}` truncated after the second
  order gives

  .. math::

    \\hat L \\leftarrow \\beta^{-1/4} \\, \\hat L \\,
      \\big(I - \\tfrac{\\epsilon}{4} X + \\tfrac{5\\epsilon^2}{32} X^2\\big).

  The step is exact (up to the :math:`O(\\|\\epsilon X\\|^3)` truncation)
  only when :math:`\\hat L` and :math:`G G^\\top` commute. They do not in
  general, and the product is then not symmetric; with ``symmetrize`` the
  result is replaced by its symmetric part
  :math:`\\tfrac12(\\hat L P + P^\\top \\hat L)`, whose first-order term
  :math:`-\\tfrac{\\epsilon}{8}(\\hat L^5 G G^\\top + G G^\\top \\hat L^5)`
  agrees with the derivative of :math:`L^{-1/4}` on the diagonal of
  :math:`L`'s eigenbasis and averages the two one-sided errors off it.
  Its error against the float64 root of the EMA statistic is measured in
  ``tests/test_shampoo.py::TestJorgeRootMethod`` (numbers: :doc:`/results/design`). The error does
  not accumulate without bound: a too large
  :math:`\\hat L` makes :math:`X` too large and the next step shrinks it.

  Step size: the series converges for :math:`\\rho(\\epsilon X) < 1`.
  :math:`X` is similar to the PSD :math:`L^{-1/2} G G^\\top L^{-1/2}`, so its
  eigenvalues are real, non-negative and bounded by the Frobenius norm
  :math:`\\|X\\|_F` (matmul-only, unlike the spectral norm). The step is
  :math:`\\epsilon = \\min\\big((1-\\beta)/\\beta,\\ s/\\|X\\|_F\\big)` with
  ``s = max_step``; ``beta=None`` gives Jorge's adaptive
  :math:`\\epsilon = s/\\|X\\|_F` (with ``s = 1``: :math:`\\rho(\\epsilon X) \\le 1`).
  A fixed β alone diverges when a low-rank gram makes :math:`\\|\\epsilon X\\|`
  large. The β actually applied, :math:`1/(1+\\epsilon)`, is returned so
  that callers can follow the statistic being tracked. A zero gram leaves
  :math:`X = 0`: the adaptive step is then 0 (β = 1, root unchanged).

  Args:
    root: ``[..., n, n]``, the current :math:`\\hat L` (symmetric positive
      definite).
    gram: ``[..., n, n]``, :math:`G G^\\top` (symmetric PSD).
    beta: EMA decay in (0, 1] or None for the adaptive step (may be traced).
    max_step: bound :math:`s` on :math:`\\epsilon\\|X\\|_F` (may be traced).
    symmetrize: return the symmetric part of the update (static).

  Returns:
    ``(new_root, beta_used)``, ``[..., n, n]`` and ``[...]``.

  Example:
    >>> import jax.numpy as jnp, optax_shampoo4 as s4
    >>> root, beta = s4.roots.jorge_root_update(jnp.eye(2), 2.0 * jnp.eye(2), beta=0.9)
    >>> round(float(root[0, 0]), 4), round(float(beta), 4)  # exact: (0.9 + 0.1 * 2) ** -0.25 = 0.9765
    (0.9776, 0.9)

  References:
    Singh & Bhatele, `Jorge: Approximate Preconditioning for GPU-efficient
    Second-order Optimization <https://arxiv.org/abs/2310.12298>`_, 2023.
  """
  root = jnp.asarray(root, jnp.float32)
  gram = jnp.asarray(gram, jnp.float32)
  root2 = matmul(root, root)
  x = matmul(matmul(root2, root2), gram)
  x_norm = jnp.linalg.norm(x, axis=(-2, -1))
  safe_norm = jnp.where(x_norm > 0, x_norm, 1.0)
  adaptive = jnp.where(x_norm > 0, max_step / safe_norm, 0.0)
  if beta is None:
    eps = adaptive
  else:
    beta = jnp.asarray(beta, jnp.float32)
    eps = jnp.minimum((1.0 - beta) / beta, jnp.where(x_norm > 0, adaptive, jnp.inf))
  beta_used = 1.0 / (1.0 + eps)
  e = eps[..., None, None]
  eye = jnp.eye(root.shape[-1], dtype=jnp.float32)
  series = eye - (e / 4.0) * x + (5.0 * e**2 / 32.0) * matmul(x, x)
  new = matmul(root, series)
  if symmetrize:
    new = 0.5 * (new + transpose(new))
  return beta_used[..., None, None] ** -0.25 * new, beta_used
