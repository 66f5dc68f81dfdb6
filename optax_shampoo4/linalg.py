"""Matrix functions for Shampoo, batched over leading axes, in float32.

Every function accepts ``[..., n, n]`` (or ``[..., n]``) inputs, runs its
matrix products at ``precision=HIGHEST`` (TPUs and GPUs would otherwise use
bf16/tf32 passes) and is safe under ``jit`` and ``vmap``.

References:
  Wang et al., `4-bit Shampoo for Memory-Efficient Network Training
  <https://arxiv.org/abs/2405.18144>`_, NeurIPS 2024 (eq. (2), (4), Alg. 2, 4).
  Björck & Bowie, `An iterative algorithm for computing the best estimate of an
  orthogonal matrix <https://doi.org/10.1137/0708036>`_, SIAM J. Numer. Anal. 1971.
  Guo & Higham, `A Schur-Newton method for the matrix p-th root and its inverse
  <https://doi.org/10.1137/050643374>`_, SIAM J. Matrix Anal. Appl. 2006.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST
# Floor on damped eigenvalues, so an all-zero statistic gives a finite root.
_MIN_DAMPED_EIGVAL = 1e-30


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a @ b`` at full float32 precision on every backend."""
  return jnp.matmul(a, b, precision=HIGHEST)


def transpose(a: jax.Array) -> jax.Array:
  """Swaps the last two axes."""
  return jnp.swapaxes(a, -1, -2)


def bjorck(v: jax.Array, steps: int = 1) -> jax.Array:
  """Björck orthonormalization, ``steps`` times.

  .. math:: V \\leftarrow \\tfrac32 V - \\tfrac12 V V^\\top V

  This is gradient descent with step 1/2 on :math:`\\|V^\\top V - I\\|_F^2`; it
  converges quadratically to the nearest orthogonal matrix when the singular
  values of ``v`` lie in :math:`(0, \\sqrt3)`. Rows and columns are
  interchangeable: rectifying :math:`V^\\top` gives the transpose of rectifying
  :math:`V`.

  Args:
    v: ``[..., n, n]``.
    steps: number of iterations (a static Python int >= 0).

  Returns:
    The rectified matrix, same shape.

  Example:
    >>> import jax.numpy as jnp, optax_shampoo4 as s4
    >>> v = jnp.array([[1.0, 0.1], [0.0, 1.0]])
    >>> w = s4.linalg.bjorck(v, steps=4)
    >>> bool(jnp.allclose(w @ w.T, jnp.eye(2), atol=1e-6))
    True
  """
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
    raise ValueError(f"steps must be an int >= 0, got steps={steps!r}")
  for _ in range(steps):
    v = 1.5 * v - 0.5 * matmul(matmul(v, transpose(v)), v)
  return v


def _q_one_at_a_time(m: jax.Array) -> jax.Array:
  # Unrolled, not lax.map: a while loop in the (untaken) refresh branch of the
  # step's lax.cond made every plain step slower on XLA:CPU (10.8 vs 7.0 ms, example-2 tree).
  flat = m.reshape((-1,) + m.shape[-2:])
  q = jnp.stack([jnp.linalg.qr(flat[i])[0] for i in range(flat.shape[0])])
  return q.reshape(m.shape)


def _q_batched(m: jax.Array) -> jax.Array:
  return jnp.linalg.qr(m)[0]


def orthonormal_basis(m: jax.Array) -> jax.Array:
  """The ``Q`` factor of the QR decomposition of each ``[..., n, n]`` matrix.

  On CPU each matrix is factored by its own LAPACK call instead of one
  batched call: jaxlib's batched CPU QR splits its batch over
  XLA's intra-op thread pool and blocks a pool thread until the pieces are
  done, so a step with as many independent batched QRs as the pool has
  threads (one per factor bucket in a statistics refresh, on a 2-core
  machine) deadlocks. GPUs and TPUs keep the batched call.

  Args:
    m: ``[..., n, n]``.

  Returns:
    ``Q`` with orthonormal columns, same shape.
  """
  if m.ndim == 2:
    return _q_batched(m)
  return lax.platform_dependent(m, cpu=_q_one_at_a_time, default=_q_batched)


def _eigh_descending_one(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  eigvals, eigvecs = jnp.linalg.eigh(a, symmetrize_input=True)
  return eigvecs[..., ::-1], eigvals[..., ::-1]


def _eigh_one_at_a_time(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  # Unrolled for the same reasons as _q_one_at_a_time (no while loop, no batched LAPACK call).
  flat = a.reshape((-1,) + a.shape[-2:])
  pairs = [_eigh_descending_one(flat[i]) for i in range(flat.shape[0])]
  eigvecs = jnp.stack([v for v, _ in pairs]).reshape(a.shape)
  eigvals = jnp.stack([w for _, w in pairs]).reshape(a.shape[:-1])
  return eigvecs, eigvals


def eigh_descending(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eigendecomposition of each symmetric ``[..., n, n]``, largest eigenvalue first.

  .. math:: A = V \\,\\mathrm{diag}(\\lambda)\\, V^\\top, \\qquad
     \\lambda_1 \\ge \\lambda_2 \\ge \\dots \\ge \\lambda_n

  ``jnp.linalg.eigh`` returns ascending eigenvalues; the order is reversed so
  that a later warm-started subspace-iteration step (:func:`qr_refresh`),
  whose leading columns converge to the *dominant* eigenvectors, starts from
  a basis it keeps in place. On CPU each matrix gets its own (unrolled)
  LAPACK call, for the reason given in :func:`orthonormal_basis` (a batched
  CPU ``eigh`` deadlocks XLA's thread pool like the batched QR does); GPUs and
  TPUs keep the batched call. A matrix with non-finite entries gives
  non-finite results (callers reject them).

  Args:
    a: symmetric ``[..., n, n]`` (the mean of ``a`` and its transpose is used).

  Returns:
    ``(V, λ)``: eigenvectors as the columns of ``V`` ``[..., n, n]`` and the
    eigenvalues ``[..., n]``, in descending order.

  Example:
    >>> import jax.numpy as jnp, optax_shampoo4 as s4
    >>> v, w = s4.linalg.eigh_descending(jnp.diag(jnp.array([1.0, 3.0, 2.0])))
    >>> w.tolist()
    [3.0, 2.0, 1.0]
  """
  if a.ndim == 2:
    return _eigh_descending_one(a)
  return lax.platform_dependent(a, cpu=_eigh_one_at_a_time, default=_eigh_descending_one)


def eigh_where(
    need: jax.Array, a: jax.Array, eigvecs: jax.Array, eigvals: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """:func:`eigh_descending` of ``a[i]`` where ``need[i]``; elsewhere ``(eigvecs[i], eigvals[i])``.

  On GPU/TPU one batched decomposition runs, inside a ``lax.cond``, only if
  some matrix needs it. On CPU every matrix is decomposed (one unbatched
  LAPACK call each, see :func:`orthonormal_basis`) and the results are
  selected: a ``lax.cond`` per factor nested in the optimizer's refresh
  branch made every *plain* (non-refresh) step slower on XLA:CPU (measured
  ~30 % on a small transformer's tree), which costs more than the skipped
  decompositions save at refresh intervals of 10-100 steps.

  Args:
    need: ``bool[k]``.
    a: symmetric ``[k, n, n]``.
    eigvecs, eigvals: ``[k, n, n]`` and ``[k, n]``, the results kept where
      ``need`` is False.

  Returns:
    ``(V, λ)`` as in :func:`eigh_descending`.
  """

  def select(need, new_vecs, new_vals):
    return (jnp.where(need[:, None, None], new_vecs, eigvecs), jnp.where(need[:, None], new_vals, eigvals))

  def compute_all(need, a):
    return select(need, *_eigh_one_at_a_time(a))

  def batched_if_needed(need, a):
    return select(need, *lax.cond(jnp.any(need), _eigh_descending_one, lambda _: (eigvecs, eigvals), a))

  return lax.platform_dependent(need, a, cpu=compute_all, default=batched_if_needed)


def sort_descending(eigvecs: jax.Array, eigvals: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Reorders eigenpairs (vectors as columns) by descending eigenvalue."""
  order = jnp.argsort(-eigvals, axis=-1)
  return (jnp.take_along_axis(eigvecs, order[..., None, :], axis=-1),
          jnp.take_along_axis(eigvals, order, axis=-1))


def qr_refresh(a: jax.Array, eigvecs: jax.Array, iterations: int = 1,
               sort: bool = True) -> tuple[jax.Array, jax.Array]:
  """Warm-started steps of orthogonal (subspace) iteration.

  .. math:: P_0 = V, \\quad P_{j+1} = \\mathrm{qr}(A P_j).Q, \\qquad
     \\lambda_i = (P^\\top A P)_{ii}

  Iterated, the columns of ``P`` converge to the eigenvectors of the symmetric
  matrix ``a`` and ``λ`` to its eigenvalues (Rayleigh quotients); 4-bit
  Shampoo takes one step per statistics update (paper eq. (4), App. B). Each
  column's sign is chosen so that :math:`R_{ii} \\ge 0`, i.e. the column
  keeps the orientation of :math:`A p_i` (a step from an exact eigenbasis
  with positive eigenvalues returns that basis unchanged). The columns are
  then sorted by descending Rayleigh quotient, so the leading columns, which
  subspace iteration converges first, hold the dominant eigenvectors at the
  next warm start.

  Args:
    a: symmetric ``[..., n, n]``.
    eigvecs: ``[..., n, n]``, the previous eigenvectors as columns.
    iterations: number of QR steps (a static Python int >= 1).
    sort: sort the columns by descending ``λ`` (False keeps the column order
      of ``eigvecs``, e.g. for SOAP, whose second moment is indexed by it).

  Returns:
    ``(P, λ)``: new eigenvectors as columns ``[..., n, n]`` and their
    Rayleigh quotients ``[..., n]``, sorted by descending ``λ`` if ``sort``.
  """
  if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
    raise ValueError(f"iterations must be an int >= 1, got iterations={iterations!r}")
  p = eigvecs
  for _ in range(iterations):
    ap = matmul(a, p)
    p = orthonormal_basis(ap)
    # R_ii = <q_i, (A P)_i>; flip q_i where it is negative (the QR factors are unique up to these signs).
    signs = jnp.where(jnp.sum(p * ap, axis=-2, keepdims=True) < 0, -1.0, 1.0)
    p = p * signs
  eigvals = jnp.sum(p * matmul(a, p), axis=-2)
  return sort_descending(p, eigvals) if sort else (p, eigvals)


def inverse_root_from_eig(
    eigvecs: jax.Array, eigvals: jax.Array, epsilon: jax.Array, p: int = 4
) -> jax.Array:
  """Inverse ``p``-th root from eigenpairs, with relative damping.

  .. math:: \\hat A = V \\,\\mathrm{diag}\\big((\\lambda + \\epsilon
     \\max_i \\lambda_i)^{-1/p}\\big)\\, V^\\top

  Negative Rayleigh quotients (rounding noise of a PSD matrix) count as 0.

  Args:
    eigvecs: ``[..., n, n]``, eigenvectors as columns.
    eigvals: ``[..., n]``.
    epsilon: relative damping ε (array-like, may be traced).
    p: the root (static).

  Returns:
    ``[..., n, n]``.
  """
  eigvals = jnp.maximum(eigvals, 0.0)
  damping = epsilon * jnp.max(eigvals, axis=-1, keepdims=True)
  damped = jnp.maximum(eigvals + damping, _MIN_DAMPED_EIGVAL)
  return matmul(eigvecs * damped[..., None, :] ** (-1.0 / p), transpose(eigvecs))


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

  Returns:
    ``[..., n, n]``.
  """
  n = a.shape[-1]
  batch = a.shape[:-2]
  if n == 1:
    return jnp.ones_like(a)
  eye = jnp.eye(n, dtype=a.dtype)
  lam_max = power_iteration(a)
  a = a + (epsilon * jnp.maximum(lam_max, 0.0))[..., None, None] * eye
  frob = jnp.linalg.norm(a, axis=(-2, -1))
  z = (1.0 + p) / (2.0 * jnp.maximum(frob, _MIN_DAMPED_EIGVAL))
  x = (z ** (1.0 / p))[..., None, None] * jnp.broadcast_to(eye, a.shape)
  m = z[..., None, None] * a
  err = jnp.max(jnp.abs(m - eye), axis=(-2, -1))
  alpha = -1.0 / p

  def matrix_power(t):
    result = None
    base, k = t, p
    while k:
      if k & 1:
        result = base if result is None else matmul(result, base)
      k >>= 1
      if k:
        base = matmul(base, base)
    return result

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
  Measured in ``tests/test_jorge.py`` (order 16, grams of rank 32 whose EMA
  moves from one random SPD statistic to another, its root by ~40%; 80
  updates from the exact initial root; relative Frobenius error against the
  float64 root of the EMA statistic): β = 0.95: 2.0% at the end, 6% at worst
  during the transient (7.8% / 12% without symmetrizing); adaptive step: 3.0%
  (5.4% without); β = 0.99: 5.6% (early errors are forgotten more slowly);
  rank-1 grams, β = 0.95: 11%; commuting (diagonal) stream: 4e-4, the series
  truncation alone. The error does not accumulate without bound: a too large
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
    >>> root, beta = s4.linalg.jorge_root_update(jnp.eye(2), 2.0 * jnp.eye(2), beta=0.9)
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
