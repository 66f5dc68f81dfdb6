r"""``scale_by_soap4``: SOAP (Adam in Shampoo's eigenbasis) with a 4-bit eigenbasis.

SOAP runs Adam in the eigenbasis of Shampoo's Kronecker factors. Its
statistic in the ``"eigen"`` format of :mod:`optax_shampoo4.factors` — float32
eigenvalues plus 4-bit eigenvectors — is exactly the pair ``(L, Q_L)`` SOAP
needs, and SOAP needs no inverse root, so each factor stores one 4-bit matrix.
The factors are the shared engine's (:mod:`optax_shampoo4.engine`): bucketed,
refreshed under ``shard_map`` with a mesh, with the same failure policy as
:func:`~optax_shampoo4.scale_by_shampoo4`. This module holds the transform, its state and
Adam's step; the bases, their refresh and the rotations are :mod:`optax_shampoo4.soap_eigenbasis`'s.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optax_shampoo4 import engine, optax_compat, options, sharding, soap_dense, soap_moments
from optax_shampoo4 import factors as fct
from optax_shampoo4 import soap_eigenbasis as basis

FORMATS = options.SOAP_FORMATS
soap_factor_config = options.soap_factor_config  # SOAP's FactorConfig from its storage options


class ScaleBySoap4State(NamedTuple):
  r"""State of :func:`scale_by_soap4`.

  Attributes:
    count: ``int32[]``, number of ``update`` calls so far.
    factors: ``{bucket name: EigenFactors}`` with ``root=None``: per factor its
      eigenvalues (float32) and eigenvectors (4-bit, or float32 for small
      orders and for ``state_format="fp32"``), stacked by order.
    mu: Adam's first moment, a tree like the parameters (float32; with
      ``moment_bits``, uint8 codes for tensors of at least
      :data:`~optax_shampoo4.moment_storage.MIN_QUANTIZED_SIZE` elements). For a
      preconditioned leaf it holds the moment in the rotated basis
      :math:`Q_L^\top M Q_R` (block by block), in the leaf's shape.
    nu: Adam's second moment, same layout as ``mu``.
    nonfinite_steps: ``int32[]``, steps whose gradient held a NaN or Inf in any
      leaf (zero update; moments and factors untouched).
    skipped_stats: ``int32[]``, basis refreshes skipped for that reason.
    failed_refreshes: ``int32[]``, factor refreshes rejected as non-finite
      (that factor kept its previous eigenpairs).
    mu_scales, nu_scales: the moments' scales (None for float32 moments).
    stats: with ``statistic="dense"``, ``{bucket name: MatrixFactors}``: per
      factor the dense float32 statistic (``root=None``); None otherwise.
  """

  count: jax.Array
  factors: dict[str, fct.Bucket]
  mu: Any
  nu: Any
  nonfinite_steps: jax.Array
  skipped_stats: jax.Array
  failed_refreshes: jax.Array
  mu_scales: Any = None
  nu_scales: Any = None
  stats: Any = None


def scale_by_soap4(
    b1: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.95,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    shampoo_beta: jax.typing.ArrayLike | None = None,
    precondition_every: int | None = None,
    max_order: int | None = None,
    max_precond_dim: int | None = None,
    state_format: options.SoapStateFormat = "eigen",
    bits: int | None = None,
    mapping: options.Mapping = "linear2",
    quant_block: int | None = None,
    min_quant_order: int | None = None,
    bjorck_steps: tuple[int, int] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    mesh_axis: str = "data",
    moment_bits: int | None = None,
    project_nu: bool | None = None,
    head_fraction: float | None = None,
    statistic: options.SoapStatistic = "refresh",
    precision: options.Precision = options.DEFAULT_PRECISION,
    tail_rectify: options.TailRectify = options.DEFAULT_TAIL_RECTIFY,
    head_bits: int | None = None,
    mid_fraction: float | None = None,
    carry: options.SoapCarry = options.DEFAULT_SOAP_CARRY,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam in the (4-bit) eigenbasis of Shampoo's Kronecker factors (SOAP).

  Each parameter is viewed as a matrix and cut into blocks as in
  :func:`~optax_shampoo4.scale_by_shampoo4`; block :math:`G` (m×n) has factors
  :math:`L \approx Q_L \Lambda_L Q_L^\top` and :math:`R \approx Q_R
  \Lambda_R Q_R^\top`. With :math:`s = t - 1` at call :math:`t`:

  .. math::

    G' = Q_L^\top G Q_R, \quad m \leftarrow \beta_1 m + (1-\beta_1) G', \quad
    v \leftarrow \beta_2 v + (1-\beta_2) G'^2, \\
    N = Q_L \Big(\frac{\sqrt{1-\beta_2^s}}{1-\beta_1^s}\,\frac{m}{\sqrt v + \epsilon}\Big) Q_R^\top

  (``m``, ``v`` live in the rotated basis). Call 1 only builds the bases and
  returns a zero update (as the reference: the first gradient never
  preconditions itself). At call 1 and every ``precondition_every`` Adam
  steps after it, *after* the step: the gradient's
  :math:`G G^\top` / :math:`G^\top G` is folded in and the basis refreshed by
  one warm-started QR step, the eigenpairs sorted by descending eigenvalue
  before it (:func:`~optax_shampoo4.factors.update_stats` with
  ``row_order``, so the refreshed basis comes out sorted and the 16-bit
  head of ``head_fraction`` holds the largest eigenvalues' rows:
  :math:`A = \beta_s Q\Lambda Q^\top + (1-\beta_s) G G^\top`,
  :math:`Q \leftarrow \mathrm{qr}(A Q)`, :math:`\lambda = \mathrm{diag}(Q^\top A Q)`),
  and ``m`` is re-projected, :math:`m \leftarrow (Q_L'^\top Q_L)\, m\,
  (Q_R^\top Q_R')`; ``v`` with the squared change of basis (``project_nu``;
  the reference only permutes it, which a quantized basis makes unstable).

  **Statistic between refreshes.** The reference folds every step's gradient
  into dense float32 statistics; here the statistic *is* the (4-bit)
  eigen-pair, which only a QR refresh can update, and a dense accumulator
  would cost the memory this format saves. So the statistic is folded at
  refresh steps only, from that step's gradient (as 4-bit Shampoo does at
  :math:`T_1`): an EMA over refreshes. ``shampoo_beta`` (per refresh)
  defaults to :math:`\beta_s = b_2^f` with :math:`f` = ``precondition_every``
  (:math:`0.95^{10} \approx 0.6`), so the statistic forgets at the
  reference's rate per *step* (time constant :math:`\approx 1/(1-b_2)` = 20
  steps) while sampling one gradient in :math:`f`. The reference's
  :math:`\beta_s = b_2` per refresh would average over :math:`f/(1-b_2)`
  ≈ 200 steps, which trailed the authors' SOAP by 16 % on a small
  autoencoder and 2-4× in suboptimality on ill-conditioned least squares
  (``benchmarks/illcond.py``, ``docs/results/illcond.md``). Correcting the
  eigenvalues from every gradient, :math:`\lambda \leftarrow \beta\lambda +
  (1-\beta)\,\mathrm{diag}(Q^\top G G^\top Q)` (free: Adam's rotated gradient
  gives it), does not close the gap where there is one: what rotates the
  basis is the statistic's off-diagonal part in the current basis, and what
  this statistic lacks is that part from every gradient, which takes an
  :math:`n \times n` accumulator (``benchmarks/soap_window.py``, 3 seeds, vs
  the reference: small MLP 1.42× with this statistic, 1.60× with the eigenvalue
  correction, 1.01× with every gradient's off-diagonal part since the last
  refresh, 0.99× with that part in 8 bits; deep linear network 1.50×, 1.56×,
  0.96×, 0.87×; 8 bits cost :math:`n^2` bytes per factor, twice the 4-bit
  eigenvectors, and cut the largest stable learning rate on least squares
  from 3.2 to 1).

  ``state_format="fp32"`` runs the same algorithm with float32 eigenvectors
  (no quantization, no Björck): the two formats differ only in storage (an
  eigen-pair per factor in both, unlike Shampoo's ``"fp32"``, which stores
  the dense statistic and root).
  ``statistic="dense"`` is the SOAP authors' algorithm (for reference runs
  and comparisons; it costs a dense float32 :math:`n \times n` statistic per
  factor, :mod:`optax_shampoo4.soap_dense`): every step with a finite
  gradient folds :math:`S \leftarrow \beta_s S + (1-\beta_s) G G^\top`
  (and :math:`G^\top G`) from :math:`S = 0`; call 1 takes
  :math:`Q = \mathrm{eigh}(S)` (descending) and makes no update; every
  ``precondition_every`` Adam steps after it the columns of :math:`Q` are
  sorted by :math:`\mathrm{diag}(Q^\top S Q)` descending, ``v`` is permuted
  with them (``project_nu`` defaults to False here), :math:`Q \leftarrow
  \mathrm{qr}(S Q)` (one power step) and ``m`` is re-projected as above.
  With ``state_format="fp32"`` it matches a float64 transcription of the
  authors' code step for step (``tests/test_soap_reference_twin.py``); the
  authors' weight decay, :math:`W \leftarrow (W - \eta N)(1 - \eta\lambda)`,
  differs from :func:`~optax_shampoo4.soap4`'s :math:`W - \eta(N +
  \lambda W)` by :math:`\eta^2\lambda N`.

  Dimensions above ``max_precond_dim`` are not rotated (identity basis on that
  side); leaves of rank ≤ 1 (after dropping size-1 dimensions) get plain Adam.
  Everything runs in float32; the output has the gradient's dtype.

  Failure policy (no exceptions under ``jit``): a step whose gradient holds a
  NaN or Inf in any leaf returns an all-zero update and leaves moments and
  factors untouched (``nonfinite_steps``, ``skipped_stats``); a factor whose
  refresh is not finite keeps its eigenpairs (``failed_refreshes``).

  Args:
    b1: Adam's first-moment decay, in [0, 1) (may be injected).
    b2: Adam's second-moment decay, in [0, 1) (may be injected).
    eps: added to :math:`\sqrt v` (may be injected).
    shampoo_beta: EMA decay of the Kronecker statistics per fold (per
      refresh for ``statistic="refresh"``, per step for ``"dense"``); None
      means :math:`b_2^f` for ``"refresh"`` (the reference's time constant
      per step) and ``b2`` for ``"dense"`` (may be injected).
    precondition_every: steps between basis refreshes (None: 10; may be injected).
    max_order: largest factor order; larger dimensions are split into blocks
      (static; None: 1024).
    max_precond_dim: matrix dimensions above this are not rotated (static;
      None: 10000, the reference's value, which leaves vocabularies alone).
    state_format: ``"eigen"`` (float32 eigenvalues plus quantized
      eigenvectors) or ``"fp32"`` (the same eigen-pairs with float32
      eigenvectors; not Shampoo's ``"fp32"``, which stores dense statistics,
      see :mod:`optax_shampoo4.options`).
    bits: bits per quantized eigenvector element: 4, 8, or 3 (eight codes
      packed in three bytes); None: 4.
    mapping: codebook, ``"linear2"``, ``"dynamic_tree"`` or ``"linear"``.
    quant_block: elements per absmax scale, along one eigenvector (None: 64).
    min_quant_order: factors of smaller order are kept in float32 (None: 64).
    bjorck_steps: ``(t1, t2)`` Björck iterations on the dequantized
      eigenvectors before a refresh and before every step's rotation. With
      a head (``head_fraction``) a refresh rectifies tier by tier with
      ``t1`` steps on each, and each step projects every tier out of the
      more precise ones before it, after ``t2`` steps on all but the 4-bit
      rows (the 4-bit rows inside the products where a block's other side
      is narrower than them: the block is projected instead of the basis,
      :mod:`optax_shampoo4.tiered_rows`): their own Björck step would cost :math:`2n^3` per factor, most
      of the step (its effect on quality: ``benchmarks/soap_basis.py``,
      :doc:`/results/design`). None: ``(1, 0)`` with a head (the 16- and
      8-bit rows come out of the refresh orthonormal to their precision;
      dropping the Björck step on them moved the illcond problems by about
      their seed spread either way, geometric mean 0.95×, and saved 7 % of
      the plain step), ``(1, 1)``
      without or with ``tail_rectify="qr_every_step"``.
    mesh: optional device mesh; the factor axis of each bucket is split over
      ``mesh_axis`` and refreshed under ``jax.shard_map`` (as
      :func:`~optax_shampoo4.scale_by_shampoo4`). Results do not depend on it.
    mesh_axis: the mesh axis the factors are split over.
    project_nu: at a basis refresh, carry ``v`` into the new basis with the
      squared change of basis, :math:`v \leftarrow (C_L \circ C_L)\, v\,
      (C_R \circ C_R)^\top` with :math:`C = Q_{new}^\top Q_{old}` (the
      second moment of :math:`C g` for independent coordinates). False keeps
      ``v``'s (permuted) entries, as the SOAP reference. With a quantized basis
      the refresh rotates near-degenerate directions (e.g. the null space of
      an early, low-rank statistic) arbitrarily; re-projected ``m`` then lands
      on coordinates whose kept ``v`` is near zero and the step
      :math:`m/\sqrt v` explodes (:doc:`/results/design`). Default True (static).
    moment_bits: None (float32 ``mu``/``nu``), 8 or 4: Adam's moments (in the
      rotated basis) stored with the schemes of :mod:`optax_shampoo4.moments`
      (block-wise codes; 4-bit second moments rank-1 normalized), dequantized,
      updated and re-quantized inside each step (static).
    head_fraction: with quantized bases, the fraction of each basis'
      eigenvectors (those of the largest eigenvalues, at least one) stored in
      ``head_bits`` bits; before use the basis is rectified head first
      (:func:`~optax_shampoo4.linalg.bjorck_head_first`: the head rows, then
      the low-bit rows made orthogonal to them). Adam's :math:`v` in a
      coordinate whose basis row is off by a relative error :math:`\delta`
      picks up about :math:`\delta^2 \bar\lambda` from the dominant
      directions; at 4 bits this swamps the small-eigenvalue coordinates,
      whose steps SOAP exists to enlarge. Keeping the dominant rows precise
      and projecting them out of the rest removes their share of that leak
      (for eigenvalues :math:`\propto i^{-2}`, order 128: about 95 % of it;
      quality measured by ``benchmarks/soap_basis.py`` and
      ``benchmarks/illcond.py``: 1/8 beat 1/16 on ill-conditioned problems,
      :doc:`/results/illcond`). 0 stores every row in ``bits`` bits (static;
      None: 1/8).
    head_bits: bits of the head rows: 16 (uniform 16-bit codes, the
      default) or 8 (``mapping``'s codebook); more than ``bits``. On
      ill-conditioned problems the head's own rounding is what leaks: a
      statistic spanning :math:`\kappa` needs the dominant rows within about
      :math:`\kappa^{-1/2}`, which 8 bits (steps of about :math:`10^{-2}`) are
      not and 16 bits are (``benchmarks/soap_head_bits.py``: on
      ``ls_power_1e6`` an 8-bit head stays 3.7× the reference SOAP's
      suboptimality, a 16-bit one matches it) (static; None: 16).
    mid_fraction: with a 16-bit head, the fraction of the eigenvectors after
      it stored in 8 bits (a second tier: rectified after the head, before
      the 4-bit rows, so neither the head's precision nor theirs is lost).
      Where the spectrum spans many decades over all rows (log-uniform), the
      4-bit rows of the next-largest eigenvalues leak into the smallest as
      the head did (``ls_logunif_1e6``: 4.1× the reference SOAP's
      suboptimality without it, 1.3× with it; 6 seeds). 0: none (static;
      None: 1/8). At GPT-2 124M shapes the defaults' whole state is 1.15×
      AdamW's (an 8-bit head alone: 1.11×; ``benchmarks/memory.py``).
    statistic: ``"refresh"`` (the eigen-pair is the statistic, folded at
      refreshes; low memory) or ``"dense"`` (the authors' dense float32
      statistic folded every step, see above) (static).
    precision: of the every-step products only (the rotations
      :math:`Q_L^\top G Q_R`, the back-rotations and, at a refresh, the
      moments' re-projection), see :func:`~optax_shampoo4.linalg.step_matmul`:
      ``"highest"`` (float32 operands), ``"high"`` (bf16×3) or ``"default"``
      (bfloat16 operands, float32 accumulation). The refresh maths (QR,
      Björck, the change of basis) always runs at full float32 precision.
    tail_rectify: with a head (``head_fraction``), how a refresh rectifies the decoded
      4-bit rows before it rebuilds the statistic
      :math:`Q \Lambda Q^\top` from them: ``"bjorck"`` (projected out of
      the head, then ``bjorck_steps[0]`` Björck steps) or ``"qr"``
      (projected out of the head, then Gram–Schmidt in descending-eigenvalue
      order, one QR per factor: exactly orthonormal, and a row's error never
      reaches the rows of larger eigenvalues, where Björck spreads it over
      all rows, so :math:`\delta\lambda_{\max}` leaks into the smallest
      directions at every refresh). Refresh steps only; the per-step use of
      the basis is the same for both. ``"qr_every_step"`` also rectifies
      the basis that way at every step (a QR per factor per step: for
      measurements, it costs about as much as the step's rotations) (static).
    carry: what carries Adam's moments into a refreshed basis, by
      :math:`m \leftarrow C_L m C_R^\top` (and ``v`` with ``project_nu``):
      ``"decoded"``: :math:`C = R_{new} R_{old}^\top` of the two bases as
      the steps decode them, which with a quantized basis also holds both
      bases' rounding (entries of about 0.02 rms at 4 bits);
      ``"refreshed"``: :math:`C = P^\top R_{old}^\top` with :math:`P` the
      refresh's float32 eigenvectors before they are quantized, the
      refresh's rotation only. Measured on ``benchmarks/illcond.py``'s twelve
      problems (``benchmarks/soap_carry.py``, :doc:`/results/illcond`), 4-bit,
      against the reference SOAP: "refreshed" is better on four (e.g.
      1.07× instead of 1.51× on ``ls_logunif_1e4``), worse on four (1.32×
      instead of 0.89× on ``ls_power_1e2``), geometric mean 1.10× for both.
      For float32 bases the two are the same (static; default ``"decoded"``).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` giving Adam's direction
    (no learning rate, no sign); see :func:`~optax_shampoo4.soap4`.

  Example:
    >>> import jax.numpy as jnp, optax, optax_shampoo4 as s4
    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    >>> tx = optax.chain(s4.scale_by_soap4(precondition_every=2), optax.scale_by_learning_rate(3e-3))
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.arange(12.0).reshape(4, 3), "b": jnp.ones(3)}
    >>> updates, state = tx.update(grads, state, params)
    >>> float(jnp.abs(updates["w"]).max())  # the first call only builds the bases
    0.0

  References:
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, ICLR 2025.
    Wang et al., `4-bit Shampoo for Memory-Efficient Network Training
    <https://arxiv.org/abs/2405.18144>`_, NeurIPS 2024.
  """
  opts = options.SoapOptions.from_kwargs(
      b1=b1, b2=b2, eps=eps, shampoo_beta=shampoo_beta, precondition_every=precondition_every,
      max_order=max_order, max_precond_dim=max_precond_dim, state_format=state_format, bits=bits,
      mapping=mapping, quant_block=quant_block, min_quant_order=min_quant_order, bjorck_steps=bjorck_steps,
      mesh=mesh, mesh_axis=mesh_axis, moment_bits=moment_bits, project_nu=project_nu,
      head_fraction=head_fraction, statistic=statistic, precision=precision, tail_rectify=tail_rectify,
      head_bits=head_bits, mid_fraction=mid_fraction, carry=carry)
  factor_engine = make_engine(opts)
  return optax_compat.gradient_transformation(functools.partial(init, opts, factor_engine),
                                              functools.partial(update, opts, factor_engine))


def make_engine(opts: options.SoapOptions) -> engine.FactorEngine:
  """The factor engine of resolved SOAP options (eigen buckets; none quantized for ``"fp32"``)."""
  return engine.FactorEngine(opts.factor_config(), opts.max_order, opts.quantized_from, opts.mesh,
                             opts.mesh_axis, opts.max_precond_dim)


def init(opts: options.SoapOptions, factor_engine: engine.FactorEngine, params: Any) -> ScaleBySoap4State:
  """The initial state: identity bases (eigenvalues 0), zero moments and counters."""
  zero = jnp.zeros([], jnp.int32)
  buckets = factor_engine.init_factors(params, 0.0, "scale_by_soap4", with_root=False)
  mu, mu_scales, nu, nu_scales = soap_moments.init_moments(opts, params)
  stats = None
  if opts.statistic == "dense":
    stats = (optax_compat.NON_PARAMS if optax_compat.is_params_placeholder(params)
             else soap_dense.init_stats(factor_engine.plan(params)))
  return ScaleBySoap4State(zero, buckets, mu, nu, zero, zero, zero, mu_scales, nu_scales, stats)


def update(opts: options.SoapOptions, factor_engine: engine.FactorEngine, updates: Any,
           state: ScaleBySoap4State, params: Any = None, **extra_args: Any) -> tuple[Any, ScaleBySoap4State]:
  """One step: Adam in the current bases, then (when due) a basis refresh; see :func:`scale_by_soap4`."""
  del params, extra_args
  step = factor_engine.start_step(updates, state.count, state.factors)
  mu = soap_moments.load_moments(opts, step, state.mu, state.mu_scales, "first")
  nu = soap_moments.load_moments(opts, step, state.nu, state.nu_scales, "second")
  bases = basis.step_bases(opts, factor_engine, step.plan, state.factors)
  # Adam in the current basis (bases built from earlier gradients only).
  adam_step = step.count - 1
  stepped = step.grads_finite & (adam_step > 0)
  outputs, mu, nu = adam_in_basis(opts, factor_engine, step, bases, mu, nu, stepped, adam_step)
  refresh_due = (adam_step == 0) | (adam_step % jnp.asarray(opts.precondition_every, jnp.int32) == 0)
  stats = state.stats
  if opts.statistic == "dense":
    stats = soap_dense.fold(stats, step.plan, step.matrices, basis.statistic_beta(opts), step.grads_finite)
  buckets, mu, nu, failures = lax.cond(
      refresh_due & step.grads_finite,
      functools.partial(basis.refresh_bases, opts, factor_engine, step, bases, stats, adam_step == 0),
      _no_refresh, factor_engine.ordered_after((state.factors, mu, nu), outputs))
  buckets = factor_engine.keep_split(buckets)
  outputs = factor_engine.ordered_after(outputs, failures)  # after the refresh (failures: its count)
  mu_stored, mu_scales = soap_moments.store_moments(opts, step, stepped, mu, state.mu, state.mu_scales, "first")
  nu_stored, nu_scales = soap_moments.store_moments(opts, step, stepped, nu, state.nu, state.nu_scales, "second")
  new_state = ScaleBySoap4State(
      count=step.count, factors=buckets, mu=mu_stored, nu=nu_stored, mu_scales=mu_scales, nu_scales=nu_scales,
      stats=stats, **engine.failure_counts(state, step.grads_finite, refresh_due, failures))
  return jax.tree.unflatten(step.treedef, outputs), new_state


def adam_in_basis(opts: options.SoapOptions, factor_engine: engine.FactorEngine, step: engine.Step,
                  bases: basis.Rows, mu: list, nu: list, stepped: jax.Array,
                  adam_step: jax.Array) -> tuple[list, list, list]:
  r"""``(outputs, mu, nu)``: Adam's step on the rotated gradient :math:`Q_L^\top G Q_R`, rotated back.

  Where the step does not count (``stepped`` False: the first call, or a
  non-finite gradient) the output is zero and the moments are kept.
  """
  b1, b2, eps = (jnp.asarray(x, jnp.float32) for x in (opts.b1, opts.b2, opts.eps))
  s = jnp.maximum(adam_step, 1).astype(jnp.float32)
  step_scale = jnp.sqrt(1.0 - b2**s) / (1.0 - b1**s)
  rotated = basis.rotate(factor_engine, step.plan, step.matrices, bases.stored, forward=True,
                         precision=opts.precision, load=bases.load)
  directions, new_mu, new_nu = [], [], []
  for leaf, g, lp, m, v in zip(step.leaves, rotated, step.plan.leaves, mu, nu):
    g = g if lp.preconditioned else leaf.astype(jnp.float32)
    m_next = b1 * m + (1.0 - b1) * g
    v_next = b2 * v + (1.0 - b2) * g * g
    directions.append(step_scale * m_next / (jnp.sqrt(v_next) + eps))
    new_mu.append(jnp.where(stepped, m_next, m))
    new_nu.append(jnp.where(stepped, v_next, v))
  back = basis.rotate(factor_engine, step.plan, directions, bases.stored, forward=False, precision=opts.precision,
                      load=bases.load)
  outputs = [jnp.where(stepped, sharding.reshape(b if lp.preconditioned else d, leaf.shape, like=leaf), 0.0).astype(leaf.dtype)
             for leaf, d, b, lp in zip(step.leaves, directions, back, step.plan.leaves)]
  return outputs, new_mu, new_nu


def _no_refresh(operand: tuple) -> tuple:
  buckets, mu, nu = operand
  return buckets, mu, nu, jnp.zeros([], jnp.int32)
