"""Matrix products and decompositions for Shampoo, batched over leading axes, in float32.

Björck orthonormalization, QR and symmetric eigendecompositions (one LAPACK
call per factor on CPU), warm-started subspace iteration. The inverse roots
built from them live in :mod:`optax_shampoo4.roots`.

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
# The settings of the per-step products (:func:`step_matmul`), most precise first.
STEP_PRECISIONS = ("highest", "high", "default")


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a @ b`` at full float32 precision on every backend."""
  return jnp.matmul(a, b, precision=HIGHEST)


def _bf16_product(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a @ b`` of bfloat16 operands, accumulated (and returned) in float32."""
  return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def split_bf16(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(hi, lo)`` in bfloat16 with ``hi = bf16(a)``, ``lo = bf16(a - hi)``: ``hi + lo`` is ``a`` to about 2⁻¹⁶."""
  hi = a.astype(jnp.bfloat16)
  return hi, (a.astype(jnp.float32) - hi.astype(jnp.float32)).astype(jnp.bfloat16)


def step_matmul(a: jax.Array, b: jax.Array, precision: str = "highest") -> jax.Array:
  r"""``a @ b`` for the every-step products (Shampoo's :math:`\hat L G \hat R`, SOAP's rotations), float32 out.

  * ``"highest"``: float32 operands at ``Precision.HIGHEST`` (:func:`matmul`);
  * ``"default"``: both operands rounded to bfloat16 (relative error
    :math:`u = 2^{-8}` each), products accumulated in float32, one bf16 pass
    (tensor cores, the MXU's native pass);
  * ``"high"`` (bf16×3): each operand split as :math:`a = a_h + a_l` in
    bfloat16 (:func:`split_bf16`) and :math:`a_h b_h + a_h b_l + a_l b_h`
    accumulated in float32; the dropped :math:`a_l b_l` and the rounding of
    the low parts leave about :math:`3 u^2 |a||b|`, three bf16 passes.

  The refresh maths (statistics, QR, eigh, Björck, roots) always uses
  :func:`matmul`. On CPU the bf16 products are computed exactly (bf16
  products are exact in float32), so the quality of each setting can be
  measured there.

  Args:
    a: ``[..., m, k]``.
    b: ``[..., k, n]``.
    precision: one of :data:`STEP_PRECISIONS`.

  Returns:
    ``a @ b``, float32.

  Example:
    >>> import jax.numpy as jnp, optax_shampoo4 as s4
    >>> a = jnp.array([[1.0 + 2.0**-12]])
    >>> float(s4.linalg.step_matmul(a, a, "default")[0, 0])  # the operand rounded to bf16
    1.0
  """
  if precision == "highest":
    return matmul(a, b)
  if precision == "default":
    return _bf16_product(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))
  if precision == "high":
    (a_hi, a_lo), (b_hi, b_lo) = split_bf16(a), split_bf16(b)
    return _bf16_product(a_hi, b_hi) + (_bf16_product(a_hi, b_lo) + _bf16_product(a_lo, b_hi))
  raise ValueError(f"precision must be one of {STEP_PRECISIONS}, got precision={precision!r}")


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


def bjorck_head_first(v: jax.Array, head_rows: int, steps: int = 1, tail_steps: int | None = None) -> jax.Array:
  """Björck on the first ``head_rows`` rows, then on the rest made orthogonal to them.

  .. math::

    H \\leftarrow \\mathrm{Björck}^{s}(H), \\quad
    T \\leftarrow \\mathrm{Björck}^{s_T}(T - T H^\\top H)

  for ``v = [H; T]`` (``H``: ``head_rows`` × n). Symmetric Björck spreads
  each row's error over all rows; this block Gram–Schmidt order keeps the
  head's (more precise) rows and removes their directions from the tail
  exactly. For eigenvectors sorted by descending eigenvalue it stops the
  (coarser) small-eigenvalue rows from picking up the dominant directions,
  which would otherwise leak the largest eigenvalues into the smallest
  coordinates. ``steps=0`` returns ``v`` unchanged.

  Args:
    v: ``[..., n, n]``, one vector a row.
    head_rows: rows in the head, ``0 < head_rows < n`` (static).
    steps: Björck iterations :math:`s` on the head (a static Python int >= 0).
    tail_steps: Björck iterations :math:`s_T` on the projected tail (None:
      ``steps``). 0 keeps only the projection, which costs
      :math:`2 (n-r) n r` multiply-adds for ``r`` head rows instead of
      about :math:`2 n^3` per Björck step.

  Returns:
    The rectified matrix, same shape.

  Example:
    >>> import jax.numpy as jnp, optax_shampoo4 as s4
    >>> v = jnp.array([[1.0, 0.0], [0.3, 1.0]])
    >>> w = s4.linalg.bjorck_head_first(v, head_rows=1, steps=3)
    >>> [[round(float(x), 6) for x in row] for row in w]  # the head row kept, the tail made orthogonal to it
    [[1.0, 0.0], [0.0, 1.0]]
  """
  if steps == 0:
    return v
  return bjorck_head_first_parts(v[..., :head_rows, :], v[..., head_rows:, :], steps, tail_steps)


def bjorck_head_first_parts(head: jax.Array, tail: jax.Array, steps: int = 1,
                            tail_steps: int | None = None) -> jax.Array:
  """:func:`bjorck_head_first` of ``[head; tail]`` given as its two row blocks (no split of a joined matrix).

  For storage that keeps the parts apart
  (:class:`~optax_shampoo4.quantization.SplitRowsQuantized`): the result is
  joined once, after the rectification.
  """
  return rectified_tiers([head, tail], steps, tail_steps)


def orthonormal_head_first_parts(head: jax.Array, tail: jax.Array, steps: int = 1) -> jax.Array:
  """``[head; tail]`` rows made exactly orthonormal, the head first: Björck on the head, then Gram–Schmidt.

  .. math::

    H \\leftarrow \\mathrm{Björck}^{s}(H), \\quad
    T \\leftarrow \\mathrm{GS}(T - T H^\\top H)

  with :math:`\\mathrm{GS}` :func:`orthonormal_rows` (a QR per matrix). Unlike
  :func:`bjorck_head_first_parts`, whose Björck steps leave the tail
  orthonormal only to their convergence, each tail row comes out orthogonal
  to the head and to every tail row before it, so a row's quantization error
  never moves the rows of larger eigenvalues. ``steps=0`` returns the parts
  joined unchanged.
  """
  return rectified_tiers([head, tail], steps, tail_qr=True)


def rectified_tiers(tiers: list[jax.Array], steps: int = 1, tail_steps: int | None = None,
                    tail_qr: bool = False, always_project: bool = False) -> jax.Array:
  """Row blocks ``[T_0; T_1; ...]``, most precise first, rectified one after the other and joined.

  .. math::

    T_0 \\leftarrow \\mathrm{Björck}^{s}(T_0), \\quad
    T_k \\leftarrow \\mathrm{Björck}^{s}\\big(T_k - T_k H_k^\\top H_k\\big), \\;
    H_k = [T_0; \\dots; T_{k-1}]

  (block Gram–Schmidt), the last block with ``tail_steps`` Björck steps
  (None: ``steps``) or, with ``tail_qr``, exact Gram–Schmidt by
  :func:`orthonormal_rows`. No block's error reaches a block before it, so a
  coarser block never moves the more precise rows of larger eigenvalues.
  ``steps=0`` returns the blocks joined unchanged, or with ``always_project``
  each projected out of the ones before it and no Björck step (block
  Gram–Schmidt without normalization).
  """
  if steps == 0 and not always_project:
    return jnp.concatenate(tiers, axis=-2)
  tail_steps = steps if tail_steps is None else tail_steps
  done = bjorck(tiers[0], steps)
  for index, block in enumerate(tiers[1:], start=1):
    block = block - matmul(matmul(block, transpose(done)), done)
    if index < len(tiers) - 1:
      block = bjorck(block, steps)
    else:
      block = orthonormal_rows(block) if tail_qr else bjorck(block, tail_steps)
    done = jnp.concatenate([done, block], axis=-2)
  return done


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
    m: ``[..., n, n]`` (or ``[..., n, r]`` with ``r <= n``: the reduced ``Q``).

  Returns:
    ``Q`` with orthonormal columns, same shape.
  """
  if m.ndim == 2:
    return _q_batched(m)
  return lax.platform_dependent(m, cpu=_q_one_at_a_time, default=_q_batched)


def orthonormal_rows(rows: jax.Array) -> jax.Array:
  """Gram–Schmidt of each ``[..., r, n]`` stack of rows (``r <= n``), in row order, by QR.

  Row ``i`` of the result is row ``i`` of ``rows`` with its components along
  rows ``0..i-1`` removed, then normalized: :math:`Q^\\top` of
  :math:`\\mathrm{qr}(R^\\top)` with the signs chosen so that the diagonal
  of the triangular factor is positive. Earlier rows are kept closest to
  their input, so for eigenvectors sorted by descending eigenvalue the
  errors of a row never spread into the directions before it. The QR runs
  per matrix on CPU (:func:`orthonormal_basis`).

  Example:
    >>> import jax.numpy as jnp, optax_shampoo4 as s4
    >>> w = s4.linalg.orthonormal_rows(jnp.array([[2.0, 0.0], [1.0, 1.0]]))
    >>> [[round(float(x), 6) + 0.0 for x in row] for row in w]  # the first row's direction is kept
    [[1.0, 0.0], [0.0, 1.0]]
  """
  cols = transpose(rows)
  q = orthonormal_basis(cols)
  signs = jnp.sign(jnp.sum(q * cols, axis=-2, keepdims=True))  # the diagonal of R = Qᵀ cols
  return transpose(q * jnp.where(signs == 0, 1.0, signs))


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
  branch made every *plain* (non-refresh) step slower on XLA:CPU (measured:
  :doc:`/results/design`), which costs more than the skipped
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
