r"""Ready-made optimizers: 4-bit Shampoo in front of a first-order method.

Each alias chains :func:`~optax_shampoo4.scale_by_shampoo4` (the grafted,
preconditioned gradient :math:`\tilde G`) with the base optimizer of the
paper's recipes (reference code ``ShampooAdamW`` / ``ShampooSGD``). The
Shampoo options are explicit keyword-only arguments (not ``**kwargs``) so that
``optax.inject_hyperparams`` can inject ``beta``/``epsilon``; the
shape-fixing ones default to None, which it leaves alone, so no
``static_args`` are needed. Each alias forwards its options by keyword to
the transforms it chains, which validate them (:mod:`optax_shampoo4.options`);
the alias checks only what it adds (learning rate, weight decay, momentum,
``moment_bits``).

The aliases of the reference algorithms, :func:`~optax_shampoo4.distributed_shampoo4` and
:func:`~optax_shampoo4.soap4`, live in :mod:`optax_shampoo4.reference_aliases` and are importable
from here too.
"""

from typing import Any, Callable

import jax
import optax

from optax_shampoo4 import moments, options, validation
from optax_shampoo4.options import DEFAULT_REFRESH_METHOD, DEFAULT_REFRESH_TOL
from optax_shampoo4.reference_aliases import distributed_shampoo4, soap4
from optax_shampoo4.shampoo import scale_by_shampoo4

__all__ = ["adagrad_shampoo4", "adamw_shampoo4", "distributed_shampoo4", "sgdm_shampoo4", "soap4"]


def adamw_shampoo4(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    max_order: int | None = None,
    beta: jax.typing.ArrayLike = 0.95,
    epsilon: jax.typing.ArrayLike = 1e-6,
    stats_every: int = 100,
    root_every: int = 500,
    state_format: options.StateFormat = "eigen",
    bits: int | None = None,
    mapping: options.Mapping = "linear2",
    quant_block: int | None = None,
    min_quant_order: int | None = None,
    bjorck_steps: tuple[int, int] = (1, 4),
    root_method: options.RootMethod | None = None,
    refresh_method: options.RefreshMethod = DEFAULT_REFRESH_METHOD,
    qr_iterations: int | None = None,
    refresh_tol: jax.typing.ArrayLike = DEFAULT_REFRESH_TOL,
    mesh: jax.sharding.Mesh | None = None,
    mesh_axis: str = "data",
    grafting: options.GraftingType = "frobenius",
    grafting_eps: jax.typing.ArrayLike | None = None,
    grafting_beta2: jax.typing.ArrayLike | None = None,
    grafting_per_block: bool | None = None,
    start_preconditioning_step: int | None = None,
    combine: options.Combine = "shampoo",
    store_root: options.StoreRoot = True,
    epsilon_mode: options.EpsilonMode = "relative",
    stats_bias_correction: bool = False,
    precondition_1d: bool = False,
    precision: options.Precision = options.DEFAULT_PRECISION,
    quant_damping: jax.typing.ArrayLike = 0.0,
    head_fraction: float | None = None,
    head_bits: int | None = None,
    tail_rectify: options.ShampooTailRectify = options.DEFAULT_TAIL_RECTIFY,
    moment_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW on the 4-bit Shampoo direction, with decoupled weight decay.

  .. math::

    m \leftarrow \beta_1 m + (1-\beta_1)\tilde G, \quad
    v \leftarrow \beta_2 v + (1-\beta_2)\tilde G^2, \quad
    W \leftarrow W - \eta\Big(\frac{\hat m}{\sqrt{\hat v} + \varepsilon}
      + \lambda W\Big)

  where :math:`\tilde G` is the output of :func:`scale_by_shampoo4` and
  :math:`\hat m, \hat v` are bias-corrected (the paper's AdamW + Shampoo).

  Keyword-only arguments ``max_order``, ``beta``, ``epsilon``, ``stats_every``, ``root_every``,
  ``state_format``, ``bits``, ``mapping``, ``quant_block``, ``min_quant_order``, ``bjorck_steps``,
  ``root_method``, ``refresh_method``, ``qr_iterations``, ``refresh_tol``, ``mesh``, ``mesh_axis``,
  ``grafting``, ``grafting_eps``, ``grafting_beta2``, ``grafting_per_block``,
  ``start_preconditioning_step``, ``combine``, ``store_root``, ``epsilon_mode``, ``stats_bias_correction``,
  ``precondition_1d``, ``precision``, ``quant_damping``, ``head_fraction``, ``head_bits``, ``tail_rectify``: passed
  to :func:`scale_by_shampoo4` (same defaults).

  Args:
    learning_rate: a float or an optax schedule.
    b1, b2, eps: Adam's moment decays and denominator epsilon.
    weight_decay: decoupled weight decay :math:`\lambda`.
    mask: which parameters get weight decay (tree of bools or a callable), as
      in :func:`optax.adamw`.
    moment_bits: keyword-only; None keeps the base optimizer's state in
      float32, 8 or 4 stores it quantized (:mod:`optax_shampoo4.moments`).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, optax_shampoo4 as s4
    >>> opt = s4.adamw_shampoo4(1e-3, weight_decay=1e-2, stats_every=10, root_every=10)
    >>> state = opt.init({"w": jnp.zeros((8, 8))})
  """
  shampoo = scale_by_shampoo4(
      max_order=max_order, beta=beta, epsilon=epsilon, stats_every=stats_every, root_every=root_every,
      state_format=state_format, bits=bits, mapping=mapping, quant_block=quant_block,
      min_quant_order=min_quant_order, bjorck_steps=bjorck_steps, root_method=root_method,
      refresh_method=refresh_method, qr_iterations=qr_iterations, refresh_tol=refresh_tol, mesh=mesh,
      mesh_axis=mesh_axis, grafting=grafting, grafting_eps=grafting_eps, grafting_beta2=grafting_beta2,
      grafting_per_block=grafting_per_block, start_preconditioning_step=start_preconditioning_step,
      combine=combine, store_root=store_root, epsilon_mode=epsilon_mode,
      stats_bias_correction=stats_bias_correction, precondition_1d=precondition_1d,
      precision=precision, quant_damping=quant_damping, head_fraction=head_fraction, head_bits=head_bits,
      tail_rectify=tail_rectify)
  options.check_alias_options(learning_rate, weight_decay=weight_decay, moment_bits=moment_bits)
  return optax.chain(
      shampoo,
      moments.scale_by_adam(b1=b1, b2=b2, eps=eps, bits=moment_bits),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def sgdm_shampoo4(
    learning_rate: optax.ScalarOrSchedule = 0.1,
    momentum: jax.typing.ArrayLike = 0.9,
    nesterov: bool = False,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    max_order: int | None = None,
    beta: jax.typing.ArrayLike = 0.95,
    epsilon: jax.typing.ArrayLike = 1e-6,
    stats_every: int = 100,
    root_every: int = 500,
    state_format: options.StateFormat = "eigen",
    bits: int | None = None,
    mapping: options.Mapping = "linear2",
    quant_block: int | None = None,
    min_quant_order: int | None = None,
    bjorck_steps: tuple[int, int] = (1, 4),
    root_method: options.RootMethod | None = None,
    refresh_method: options.RefreshMethod = DEFAULT_REFRESH_METHOD,
    qr_iterations: int | None = None,
    refresh_tol: jax.typing.ArrayLike = DEFAULT_REFRESH_TOL,
    mesh: jax.sharding.Mesh | None = None,
    mesh_axis: str = "data",
    grafting: options.GraftingType = "frobenius",
    grafting_eps: jax.typing.ArrayLike | None = None,
    grafting_beta2: jax.typing.ArrayLike | None = None,
    grafting_per_block: bool | None = None,
    start_preconditioning_step: int | None = None,
    combine: options.Combine = "shampoo",
    store_root: options.StoreRoot = True,
    epsilon_mode: options.EpsilonMode = "relative",
    stats_bias_correction: bool = False,
    precondition_1d: bool = False,
    precision: options.Precision = options.DEFAULT_PRECISION,
    quant_damping: jax.typing.ArrayLike = 0.0,
    head_fraction: float | None = None,
    head_bits: int | None = None,
    tail_rectify: options.ShampooTailRectify = options.DEFAULT_TAIL_RECTIFY,
    moment_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SGD with momentum on the 4-bit Shampoo direction, coupled L2 after grafting.

  .. math::

    d = \tilde G + \lambda W, \quad b \leftarrow \mu b + d, \quad
    W \leftarrow W - \eta\,(d + \mu b \text{ if nesterov else } b)

  The decay term is added after preconditioning, so it is not preconditioned
  (reference code ``ShampooSGD``).

  Keyword-only arguments ``max_order``, ``beta``, ``epsilon``, ``stats_every``, ``root_every``,
  ``state_format``, ``bits``, ``mapping``, ``quant_block``, ``min_quant_order``, ``bjorck_steps``,
  ``root_method``, ``refresh_method``, ``qr_iterations``, ``refresh_tol``, ``mesh``, ``mesh_axis``,
  ``grafting``, ``grafting_eps``, ``grafting_beta2``, ``grafting_per_block``,
  ``start_preconditioning_step``, ``combine``, ``store_root``, ``epsilon_mode``, ``stats_bias_correction``,
  ``precondition_1d``, ``precision``, ``quant_damping``, ``head_fraction``, ``head_bits``, ``tail_rectify``: passed
  to :func:`scale_by_shampoo4` (same defaults).

  Args:
    learning_rate: a float or an optax schedule.
    momentum: :math:`\mu`.
    nesterov: use Nesterov momentum.
    weight_decay: coupled L2 coefficient :math:`\lambda`.
    mask: which parameters get weight decay.
    moment_bits: keyword-only; None keeps the base optimizer's state in
      float32, 8 or 4 stores it quantized (:mod:`optax_shampoo4.moments`).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.
  """
  shampoo = scale_by_shampoo4(
      max_order=max_order, beta=beta, epsilon=epsilon, stats_every=stats_every, root_every=root_every,
      state_format=state_format, bits=bits, mapping=mapping, quant_block=quant_block,
      min_quant_order=min_quant_order, bjorck_steps=bjorck_steps, root_method=root_method,
      refresh_method=refresh_method, qr_iterations=qr_iterations, refresh_tol=refresh_tol, mesh=mesh,
      mesh_axis=mesh_axis, grafting=grafting, grafting_eps=grafting_eps, grafting_beta2=grafting_beta2,
      grafting_per_block=grafting_per_block, start_preconditioning_step=start_preconditioning_step,
      combine=combine, store_root=store_root, epsilon_mode=epsilon_mode,
      stats_bias_correction=stats_bias_correction, precondition_1d=precondition_1d,
      precision=precision, quant_damping=quant_damping, head_fraction=head_fraction, head_bits=head_bits,
      tail_rectify=tail_rectify)
  options.check_alias_options(learning_rate, weight_decay=weight_decay, moment_bits=moment_bits)
  validation.check_range("momentum", momentum, 0.0, 1.0)  # moments.trace checks it as `decay`, in [0, 1]
  return optax.chain(
      shampoo,
      optax.add_decayed_weights(weight_decay, mask),
      moments.trace(decay=momentum, nesterov=nesterov, bits=moment_bits),
      optax.scale_by_learning_rate(learning_rate),
  )


def adagrad_shampoo4(
    learning_rate: optax.ScalarOrSchedule = 1e-2,
    initial_accumulator_value: jax.typing.ArrayLike = 0.0,
    eps: jax.typing.ArrayLike = 1e-10,
    *,
    max_order: int | None = None,
    beta: jax.typing.ArrayLike = 0.95,
    epsilon: jax.typing.ArrayLike = 1e-6,
    stats_every: int = 100,
    root_every: int = 500,
    state_format: options.StateFormat = "eigen",
    bits: int | None = None,
    mapping: options.Mapping = "linear2",
    quant_block: int | None = None,
    min_quant_order: int | None = None,
    bjorck_steps: tuple[int, int] = (1, 4),
    root_method: options.RootMethod | None = None,
    refresh_method: options.RefreshMethod = DEFAULT_REFRESH_METHOD,
    qr_iterations: int | None = None,
    refresh_tol: jax.typing.ArrayLike = DEFAULT_REFRESH_TOL,
    mesh: jax.sharding.Mesh | None = None,
    mesh_axis: str = "data",
    grafting: options.GraftingType = "frobenius",
    grafting_eps: jax.typing.ArrayLike | None = None,
    grafting_beta2: jax.typing.ArrayLike | None = None,
    grafting_per_block: bool | None = None,
    start_preconditioning_step: int | None = None,
    combine: options.Combine = "shampoo",
    store_root: options.StoreRoot = True,
    epsilon_mode: options.EpsilonMode = "relative",
    stats_bias_correction: bool = False,
    precondition_1d: bool = False,
    precision: options.Precision = options.DEFAULT_PRECISION,
    quant_damping: jax.typing.ArrayLike = 0.0,
    head_fraction: float | None = None,
    head_bits: int | None = None,
    tail_rectify: options.ShampooTailRectify = options.DEFAULT_TAIL_RECTIFY,
    moment_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Adagrad on the 4-bit Shampoo direction (the paper's Table 10 recipe).

  Keyword-only arguments ``max_order``, ``beta``, ``epsilon``, ``stats_every``, ``root_every``,
  ``state_format``, ``bits``, ``mapping``, ``quant_block``, ``min_quant_order``, ``bjorck_steps``,
  ``root_method``, ``refresh_method``, ``qr_iterations``, ``refresh_tol``, ``mesh``, ``mesh_axis``,
  ``grafting``, ``grafting_eps``, ``grafting_beta2``, ``grafting_per_block``,
  ``start_preconditioning_step``, ``combine``, ``store_root``, ``epsilon_mode``, ``stats_bias_correction``,
  ``precondition_1d``, ``precision``, ``quant_damping``, ``head_fraction``, ``head_bits``, ``tail_rectify``: passed
  to :func:`scale_by_shampoo4` (same defaults).

  Args:
    learning_rate: a float or an optax schedule.
    initial_accumulator_value: initial sum of squares.
    eps: added inside the square root.
    moment_bits: keyword-only; None keeps the base optimizer's state in
      float32, 8 or 4 stores it quantized (:mod:`optax_shampoo4.moments`).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.
  """
  shampoo = scale_by_shampoo4(
      max_order=max_order, beta=beta, epsilon=epsilon, stats_every=stats_every, root_every=root_every,
      state_format=state_format, bits=bits, mapping=mapping, quant_block=quant_block,
      min_quant_order=min_quant_order, bjorck_steps=bjorck_steps, root_method=root_method,
      refresh_method=refresh_method, qr_iterations=qr_iterations, refresh_tol=refresh_tol, mesh=mesh,
      mesh_axis=mesh_axis, grafting=grafting, grafting_eps=grafting_eps, grafting_beta2=grafting_beta2,
      grafting_per_block=grafting_per_block, start_preconditioning_step=start_preconditioning_step,
      combine=combine, store_root=store_root, epsilon_mode=epsilon_mode,
      stats_bias_correction=stats_bias_correction, precondition_1d=precondition_1d,
      precision=precision, quant_damping=quant_damping, head_fraction=head_fraction, head_bits=head_bits,
      tail_rectify=tail_rectify)
  options.check_alias_options(learning_rate, moment_bits=moment_bits)
  return optax.chain(
      shampoo,
      moments.scale_by_rss(initial_accumulator_value=initial_accumulator_value, eps=eps, bits=moment_bits),
      optax.scale_by_learning_rate(learning_rate),
  )
