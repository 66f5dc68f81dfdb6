r"""Quantized first-order moments: 8- and 4-bit Adam, momentum and Adagrad states.

Each moment tensor lives in the optimizer state as uint8 codes plus float32
scales (:class:`~optax_shampoo4.moment_storage.QuantizedMoment`); every step dequantizes it, updates it in
float32 and quantizes it again, all inside the jitted update, so state shapes
and dtypes never change. The schemes (:data:`~optax_shampoo4.moment_storage.SCHEMES`):

* **8 bits** (Dettmers et al. 2022): block-wise absmax along the last axis,
  blocks of 256, the signed dynamic tree codebook for the first moment and the
  unsigned dynamic tree (no sign bit: one more bit of mantissa, 7 decades of
  range) for the second.
* **4 bits** (Li et al. 2023): the first moment block-wise with blocks of 128
  and the signed 4-bit dynamic tree; the second moment of a tensor with
  ``ndim >= 2`` with *rank-1 normalization*, :math:`\hat v_{ij} =
  \min(r_i, c_j)\,R(q_{ij})` where :math:`r, c` are the row and column maxima
  (for more axes, the minimum over axes of each axis' maxima), and the
  zero-free linear codebook :math:`R(j) = (j+1)/16`; a 1-D second moment uses
  blocks of 128 with that codebook.
* A positive second moment is never stored as 0 (that would make
  :math:`1/\sqrt{v}` explode): it gets at least the smallest positive code.
* Rounding: a moment that is an EMA re-quantized every step gets stuck at a
  code when rounded to the nearest one (:math:`0.9\,m` rounds back to
  :math:`m`), so momentum never decays; the transforms therefore round first
  moments *stochastically* (unbiased), and 8-bit second moments too. 4-bit
  second moments round to the nearest code, whose noise would otherwise enter
  :math:`1/\sqrt{v}` (the effect of the rounding on training:
  :doc:`/results/design`). The random bits are a counter-based hash of a key folded from the
  step count and of each element's index (:func:`~optax_shampoo4.moment_storage.rounding_uniform`),
  so no key lives in the state and runs are reproducible. See :data:`~optax_shampoo4.moment_storage.SCHEMES`.

Tensors with fewer than :data:`~optax_shampoo4.moment_storage.MIN_QUANTIZED_SIZE` elements (biases, norms)
stay float32: quantizing them saves little memory and costs a kernel launch each.

Failure policy: the update is computed from the new float32 moments, so a
non-finite gradient gives a non-finite update as in optax (wrap the optimizer
in :func:`optax.apply_if_finite` to skip such steps). The stored moments are
never overwritten by non-finite values: a tensor whose new moments are not all
finite keeps its previous codes and scales, and ``nonfinite_count`` in the
state counts the steps where that happened.

References:
  Dettmers et al., `8-bit Optimizers via Block-wise Quantization
  <https://arxiv.org/abs/2110.02861>`_, ICLR 2022.
  Li, Chen and Zhu, `Memory Efficient Optimizers with 4-bit States
  <https://arxiv.org/abs/2309.01507>`_, NeurIPS 2023.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_shampoo4 import moment_storage, validation


def _load(codes: Any, scales: Any, shape: tuple[int, ...], bits: int, kind: str) -> jax.Array:
  """The float32 moment of one leaf from its stored codes and scales."""
  return moment_storage.load_moment(moment_storage.join_stored(codes, scales, shape, bits, kind))


def _store(values: Any, codes: Any, scales: Any, finite: Any, bits: int, kind: str, count: jax.Array) -> tuple:
  """``(codes, scales)`` of the new moments, rounded with this step's key; non-finite leaves keep the old."""
  return moment_storage.store_moment_trees(values, codes, scales, finite, bits, kind,
                                           moment_storage.rounding_key(count, bits, kind))


def _all_finite(*arrays: jax.Array) -> jax.Array:
  return functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(a)) for a in arrays])


def _map_moments(leaf_fn: Any, updates: Any, *stored: Any) -> tuple[Any, ...]:
  """Applies ``leaf_fn(g, *stored_leaves) -> tuple`` per gradient leaf; returns one tree per output."""
  treedef = jax.tree.structure(updates)
  columns = [treedef.flatten_up_to(tree) for tree in stored]
  results = [leaf_fn(g, *rest) for g, *rest in zip(treedef.flatten_up_to(updates), *columns)]
  return tuple(treedef.unflatten(list(outputs)) for outputs in zip(*results))


def _count_failures(count: jax.Array, finite: Any) -> jax.Array:
  flags = jax.tree.leaves(finite)
  if not flags:
    return count
  all_ok = functools.reduce(jnp.logical_and, flags)
  return count + jnp.where(all_ok, 0, 1).astype(count.dtype)


class QuantizedAdamState(NamedTuple):
  """State of :func:`scale_by_adam` with quantized moments (trees shaped like the parameters)."""

  count: jax.Array  # int32 step count
  mu: Any  # first moments: uint8 codes (float32 values for small tensors)
  mu_scales: Any  # their float32 scales (0-d placeholders for small tensors)
  nu: Any  # second moments: uint8 codes (float32 values for small tensors)
  nu_scales: Any
  nonfinite_count: jax.Array  # int32: steps whose non-finite moments were not stored


def _to_float32(tree: Any) -> Any:
  """Floating-point array leaves of ``tree`` cast to float32 (other leaves, e.g. placeholders, as they are)."""

  def cast(x):
    floating = hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
    return x.astype(jnp.float32) if floating else x

  return jax.tree.map(cast, tree)


def _in_float32(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """``inner`` with float32 state and arithmetic; the updates keep their dtypes.

  For float16 gradients, optax's Adam rounds ``eps = 1e-8`` to 0 and turns a zero gradient into 0/0 = NaN.
  """

  def init_fn(params):
    return inner.init(_to_float32(params))

  def update_fn(updates, state, params=None):
    steps, state = inner.update(_to_float32(updates), state, _to_float32(params))
    return jax.tree.map(lambda step, u: step.astype(u.dtype), steps, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_adam(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    *,
    bits: int | None = 8,
) -> optax.GradientTransformation:
  r"""Adam's rescaling with its moments stored in ``bits`` bits.

  .. math::

    m \leftarrow Q(\beta_1 D(m) + (1-\beta_1) g), \quad
    v \leftarrow Q(\beta_2 D(v) + (1-\beta_2) g^2), \quad
    u = \frac{\hat m}{\sqrt{\hat v + \epsilon_{root}} + \epsilon}

  with :math:`D, Q` = :func:`~optax_shampoo4.moment_storage.load_moment`,
  :func:`~optax_shampoo4.moment_storage.store_moment`, and
  :math:`\hat m, \hat v` the bias-corrected float32 moments before
  quantization. Updates keep the gradient's dtype.

  Args:
    b1, b2: decay rates of the first and second moments.
    eps: added to the denominator.
    eps_root: added to :math:`\hat v` inside the square root.
    bits: 8 or 4; None gives :func:`optax.scale_by_adam` with float32 moments and arithmetic
      (exactly it for float32 parameters).

  Returns:
    An :class:`optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optax, optax_shampoo4 as s4
    >>> opt = optax.chain(s4.moments.scale_by_adam(bits=8), optax.scale_by_learning_rate(1e-3))
    >>> state = opt.init({"w": jnp.zeros((128, 64)), "b": jnp.zeros(64)})
    >>> state[0].mu["w"].dtype, state[0].mu["b"].dtype  # the bias is too small to quantize
    (dtype('uint8'), dtype('float32'))
  """
  moment_storage.check_moment_bits("bits", bits)
  validation.check_range("b1", b1, 0.0, 1.0)
  validation.check_range("b2", b2, 0.0, 1.0)
  validation.check_range("eps", eps, 0.0, float("inf"))
  validation.check_range("eps_root", eps_root, 0.0, float("inf"))
  if bits is None:
    return _in_float32(optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root))

  def init_fn(params):
    mu, mu_scales = moment_storage.init_moment_trees(params, bits, "first")
    nu, nu_scales = moment_storage.init_moment_trees(params, bits, "second")
    return QuantizedAdamState(jnp.zeros([], jnp.int32), mu, mu_scales, nu, nu_scales, jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    count = jnp.asarray(optax.safe_int32_increment(state.count))
    if not jax.tree.leaves(updates):
      return updates, state._replace(count=count)
    correction1 = 1 - jnp.asarray(b1, jnp.float32) ** count
    correction2 = 1 - jnp.asarray(b2, jnp.float32) ** count

    def leaf(g, mu_codes, mu_scales, nu_codes, nu_scales):
      g32 = g.astype(jnp.float32)
      mu = (1 - b1) * g32 + b1 * _load(mu_codes, mu_scales, g.shape, bits, "first")
      nu = (1 - b2) * (g32 * g32) + b2 * _load(nu_codes, nu_scales, g.shape, bits, "second")
      step = (mu / correction1) / (jnp.sqrt(nu / correction2 + eps_root) + eps)
      return step.astype(g.dtype), mu, nu, _all_finite(mu, nu)

    steps, mu, nu, finite = _map_moments(leaf, updates, state.mu, state.mu_scales, state.nu, state.nu_scales)
    mu, mu_scales = _store(mu, state.mu, state.mu_scales, finite, bits, "first", count)
    nu, nu_scales = _store(nu, state.nu, state.nu_scales, finite, bits, "second", count)
    return steps, QuantizedAdamState(count, mu, mu_scales, nu, nu_scales,
                                     _count_failures(state.nonfinite_count, finite))

  return optax.GradientTransformation(init_fn, update_fn)


class QuantizedTraceState(NamedTuple):
  """State of :func:`trace` with a quantized momentum buffer."""

  count: jax.Array  # int32 step count (seeds the stochastic rounding)
  trace: Any  # uint8 codes (float32 values for small tensors)
  trace_scales: Any  # float32 scales (0-d placeholders for small tensors)
  nonfinite_count: jax.Array  # int32


def trace(
    decay: jax.typing.ArrayLike, nesterov: bool = False, *, bits: int | None = 8
) -> optax.GradientTransformation:
  r"""Momentum :math:`b \leftarrow Q(g + \mu D(b))`, stored in ``bits`` bits.

  Returns :math:`b` (or :math:`g + \mu b` with ``nesterov``), in the
  gradient's dtype; ``bits=None`` gives exactly :func:`optax.trace`.

  Args:
    decay: the momentum :math:`\mu`.
    nesterov: use Nesterov momentum.
    bits: 8 or 4; None for float32 (optax).

  Returns:
    An :class:`optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optax_shampoo4 as s4
    >>> opt = s4.moments.trace(0.9, bits=4)
    >>> opt.init({"w": jnp.zeros((64, 128))}).trace["w"].shape  # two 4-bit codes a byte
    (64, 64)
  """
  moment_storage.check_moment_bits("bits", bits)
  validation.check_range("decay", decay, 0.0, 1.0, high_inclusive=True)
  if not isinstance(nesterov, bool):
    raise TypeError(f"nesterov must be a bool, got nesterov={nesterov!r}")
  if bits is None:
    return optax.trace(decay=decay, nesterov=nesterov)

  def init_fn(params):
    return QuantizedTraceState(jnp.zeros([], jnp.int32), *moment_storage.init_moment_trees(params, bits, "first"),
                               jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    if not jax.tree.leaves(updates):
      return updates, state
    count = jnp.asarray(optax.safe_int32_increment(state.count))

    def leaf(g, codes, scales):
      g32 = g.astype(jnp.float32)
      buffer = g32 + decay * _load(codes, scales, g.shape, bits, "first")
      step = g32 + decay * buffer if nesterov else buffer
      return step.astype(g.dtype), buffer, _all_finite(buffer)

    steps, buffers, finite = _map_moments(leaf, updates, state.trace, state.trace_scales)
    codes, scales = _store(buffers, state.trace, state.trace_scales, finite, bits, "first", count)
    return steps, QuantizedTraceState(count, codes, scales, _count_failures(state.nonfinite_count, finite))

  return optax.GradientTransformation(init_fn, update_fn)


class QuantizedRssState(NamedTuple):
  """State of :func:`scale_by_rss` with a quantized accumulator."""

  count: jax.Array  # int32 step count (seeds the stochastic rounding)
  sum_of_squares: Any  # uint8 codes (float32 values for small tensors)
  sum_of_squares_scales: Any  # float32 scales (0-d placeholders for small tensors)
  nonfinite_count: jax.Array  # int32


def scale_by_rss(
    initial_accumulator_value: jax.typing.ArrayLike = 0.1,
    eps: jax.typing.ArrayLike = 1e-7,
    *,
    bits: int | None = 8,
) -> optax.GradientTransformation:
  r"""Adagrad's rescaling :math:`g / \sqrt{s + \epsilon}`, :math:`s \leftarrow Q(D(s) + g^2)`.

  The accumulator is stored as a ``"second"`` moment (non-negative, never
  rounded to 0 once positive). A sum rounded to the nearest code every step
  (4 bits) drops increments smaller than half a code step of its block, so
  Adagrad's steps then shrink more slowly than in float32; 8 bits round
  stochastically (unbiased).

  Args:
    initial_accumulator_value: initial :math:`s`.
    eps: added inside the square root.
    bits: 8 or 4; None gives exactly :func:`optax.scale_by_rss`.

  Returns:
    An :class:`optax.GradientTransformation`.
  """
  moment_storage.check_moment_bits("bits", bits)
  validation.check_range("initial_accumulator_value", initial_accumulator_value, 0.0, float("inf"))
  validation.check_range("eps", eps, 0.0, float("inf"))
  if bits is None:
    return optax.scale_by_rss(initial_accumulator_value=initial_accumulator_value, eps=eps)

  def init_fn(params):
    return QuantizedRssState(jnp.zeros([], jnp.int32),
                             *moment_storage.init_moment_trees(params, bits, "second", initial_accumulator_value),
                             jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    if not jax.tree.leaves(updates):
      return updates, state
    count = jnp.asarray(optax.safe_int32_increment(state.count))

    def leaf(g, codes, scales):
      g32 = g.astype(jnp.float32)
      total = g32 * g32 + _load(codes, scales, g.shape, bits, "second")
      step = jnp.where(total > 0, jax.lax.rsqrt(total + eps), 0.0) * g32
      return step.astype(g.dtype), total, _all_finite(total)

    steps, sums, finite = _map_moments(leaf, updates, state.sum_of_squares, state.sum_of_squares_scales)
    codes, scales = _store(sums, state.sum_of_squares, state.sum_of_squares_scales, finite, bits, "second", count)
    return steps, QuantizedRssState(count, codes, scales, _count_failures(state.nonfinite_count, finite))

  return optax.GradientTransformation(init_fn, update_fn)
