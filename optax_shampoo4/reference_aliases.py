r"""Ready-made optimizers that follow a reference algorithm: Meta's Distributed Shampoo and the SOAP authors'.

:func:`~optax_shampoo4.distributed_shampoo4` runs Distributed Shampoo's update rule (Shi et al. 2023) on the
4-bit Shampoo state of :func:`~optax_shampoo4.scale_by_shampoo4`; :func:`~optax_shampoo4.soap4` chains
:func:`~optax_shampoo4.scale_by_soap4` with decoupled weight decay and a learning rate, with the SOAP
reference's defaults. As the aliases of :mod:`optax_shampoo4.alias`, each repeats its transform's options as
explicit keyword-only arguments (so ``optax.inject_hyperparams`` needs no ``static_args``) and forwards them
by keyword; the transforms validate them, the alias checks only what it adds.
"""

from typing import Any, Callable

import jax
import optax

from optax_shampoo4 import moments, options, validation
from optax_shampoo4.options import DEFAULT_REFRESH_METHOD, DEFAULT_REFRESH_TOL
from optax_shampoo4.shampoo import scale_by_shampoo4
from optax_shampoo4.soap import scale_by_soap4

# distributed_shampoo4's floor under a quantized basis' eigenvalues, relative to the largest
# (benchmarks/illcond.py: ds_4bit against ds_fp32; docs/results/illcond.md).
DS_QUANT_DAMPING = 1e-6
# The default state layout of distributed_shampoo4 with a quantized basis: the bytes of the 4-bit basis and
# the 4-bit root spent on an 8-bit basis, the roots applied from it at every step (see the docstring).
DS_BASIS_BITS = 8
DS_BJORCK_STEPS = (1, 0)


def distributed_shampoo4(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    momentum: jax.typing.ArrayLike = 0.0,
    nesterov: bool = False,
    *,
    grafting: options.GraftingType = "adam",
    grafting_per_block: bool | None = None,
    start_preconditioning_step: int | None = None,
    combine: options.Combine = "shampoo",
    use_bias_correction: bool = True,
    max_order: int | None = None,
    beta: jax.typing.ArrayLike = 1.0,
    epsilon: jax.typing.ArrayLike = 1e-12,
    epsilon_mode: options.EpsilonMode = "absolute",
    precondition_1d: bool = True,
    stats_every: int = 10,
    root_every: int = 100,
    state_format: options.StateFormat = "eigen",
    bits: int | None = None,
    mapping: options.Mapping = "linear2",
    quant_block: int | None = None,
    min_quant_order: int | None = None,
    bjorck_steps: tuple[int, int] | None = None,
    root_method: options.RootMethod | None = None,
    refresh_method: options.RefreshMethod = DEFAULT_REFRESH_METHOD,
    qr_iterations: int | None = None,
    refresh_tol: jax.typing.ArrayLike = DEFAULT_REFRESH_TOL,
    mesh: jax.sharding.Mesh | None = None,
    mesh_axis: str = "data",
    store_root: options.StoreRoot | None = None,
    precision: options.Precision = options.DEFAULT_PRECISION,
    quant_damping: jax.typing.ArrayLike = DS_QUANT_DAMPING,
    head_fraction: float | None = None,
    head_bits: int | None = None,
    tail_rectify: options.ShampooTailRectify = options.DEFAULT_TAIL_RECTIFY,
    moment_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Distributed Shampoo's update rule (Shi et al. 2023) on the 4-bit Shampoo state.

  At step :math:`t` (from 1), with raw gradient :math:`G` and the grafted
  method's accumulator :math:`A` (Adam grafting shown):

  .. math::

    L, R &\leftarrow \text{statistics of } G \text{ (every } T_1 \text{ steps; roots every } T_2) \\
    A &\leftarrow b_2 A + (1-b_2) G^2, \qquad
    M \leftarrow b_1 M + (1-b_1) G, \qquad X = M / (1-b_1^t) \\
    P_g &= X / (\sqrt{A/(1-b_2^t)} + \varepsilon), \qquad
    P = \begin{cases} P_g & t < t_0 \\
      \hat L X \hat R\;\|P_g\|_F / \|\hat L X \hat R\|_F & t \ge t_0 \end{cases}
      \ \text{(norms per block)} \\
    D &= P + \lambda W, \qquad B \leftarrow \mu B + D, \qquad
    W \leftarrow W - \eta\,(D + \mu B \text{ if nesterov else } B)

  so the first moment is shared between Shampoo and the grafted method (only
  the second moment is grafted), the weight decay is decoupled and the
  optional heavy-ball momentum comes last, as in Meta's implementation
  (``betas=(b1, ·)``, ``grafting_config=AdamPreconditionerConfig(b2, eps)``,
  ``use_bias_correction``, ``weight_decay_type=DECOUPLED``). With ``momentum=0``
  the last step is the identity.

  Keyword-only arguments ``max_order``, ``beta``, ``epsilon``, ``stats_every``, ``root_every``,
  ``state_format``, ``bits``, ``mapping``, ``quant_block``, ``min_quant_order``, ``bjorck_steps``,
  ``root_method``, ``refresh_method``, ``qr_iterations``, ``refresh_tol``, ``mesh``, ``mesh_axis``,
  ``store_root``, ``epsilon_mode``, ``precondition_1d``, ``precision``, ``quant_damping``, ``head_fraction``,
  ``head_bits``, ``tail_rectify``: passed to :func:`scale_by_shampoo4`; here
  ``stats_every=10`` and ``root_every=100`` (Meta's AlgoPerf submission refreshed its roots every 100
  steps) and, by default, Meta's statistics: ``beta=1.0`` (the Gram matrices are summed from zero, as
  Meta's ``betas[1] = 1``), ``epsilon=1e-12`` added as an absolute constant at root time
  (``epsilon_mode="absolute"``: roots of :math:`L/c + \epsilon I`, where :math:`c = 1-\beta^k` is the
  statistics' bias correction after :math:`k` updates when ``use_bias_correction`` and :math:`\beta < 1`),
  and vectors preconditioned with one full factor per block (``precondition_1d=True``, exponent
  :math:`-1/2`). ``epsilon_mode="relative", beta=0.95, epsilon=1e-6, precondition_1d=False`` is the
  paper's 4-bit Shampoo statistic under Distributed Shampoo's update rule. Not reproduced: Meta's
  ``merge_small_dims`` (a tensor whose dimensions multiply to at most ``max_order`` is preconditioned
  as one vector there, as a matrix here) and one factor per dimension of tensors of rank > 2 (here
  the matrix view of :mod:`optax_shampoo4.partition`). Meta folds the statistics at every step
  (``stats_every=1``).

  With a quantized basis (``state_format="eigen"``) the roots are also damped by
  ``quant_damping`` :math:`\delta = 10^{-6}` relative to the largest eigenvalue,
  :math:`(\Lambda + \epsilon + \delta\lambda_{\max})^{-1/4}`: the 4-bit eigenvectors' rounding
  error reaches the smallest eigen-directions at about :math:`\delta_q\lambda_{\max}`, and with
  Meta's :math:`\epsilon = 10^{-12}` their roots, amplified by up to :math:`\epsilon^{-1/4}`,
  made the 4-bit optimizer unstable at learning rates where the float32 one is stable
  (``benchmarks/illcond.py``). ``state_format="fp32"`` ignores it: the twin stays Meta's algorithm.

  The quantized state's default layout (``store_root=None, bits=None`` with ``state_format="eigen"``
  and eigenpair roots) is ``bits=8, store_root=False, bjorck_steps=(1, 0)``: an 8-bit basis and no
  stored root, the same bytes as a 4-bit basis plus a 4-bit root (slightly fewer: no float32 root
  diagonal). The roots are then applied from the stored eigenpairs at every step (a decode, then
  :math:`\hat L G = W (W^\top G)` with :math:`W = V (\Lambda + \epsilon)^{-1/8}`; no decomposition and,
  as the 8-bit basis is orthonormal to its rounding, no Björck step), so they follow every statistics
  update; each step costs twice the products of a stored root, which is only decoded. On ill-conditioned
  statistics (spectra over several decades) the 4-bit basis and the 4-bit root each cost up to
  ~25–150× in suboptimality (``benchmarks/shampoo4_quant_sources.py``): every refresh re-encodes the
  statistic :math:`V\Lambda V^\top` through 4-bit eigenvectors, whose rounding moves mass of the
  largest eigenvalues into the smallest, and the root's 4-bit rounding, relative to its largest
  entries, swamps its smallest eigenvalues. With this layout the alias is within 1.05× of its float32
  twin or better on every ``benchmarks/illcond.py`` problem but the two solved to the float32 floor
  (:math:`f - f^* \approx 10^{-12}`: 1.14×, 1.17×; the 4-bit layout: 1.54×, 1.57×, and up to 26×
  elsewhere). Passing ``store_root`` or ``bits`` chooses the layout as in :func:`scale_by_shampoo4`:
  ``store_root=True`` (``bits=None``: 4) is the paper's 4-bit layout (:func:`ds_state_layout`).

  Args:
    learning_rate: a float or an optax schedule.
    b1: decay of the filtered gradient :math:`M` (Meta's ``betas[0]``); 0 turns
      the filtering off.
    b2: :math:`\beta_2` of the ``"rmsprop"`` / ``"adam"`` grafting.
    eps: :math:`\varepsilon` of the grafted method (passed as
      ``grafting_eps``); in the other aliases ``eps`` is the base optimizer's
      (Adam's, Adagrad's) and Shampoo's own damping is always ``epsilon``.
    weight_decay: decoupled weight decay :math:`\lambda`.
    mask: which parameters get weight decay, as in :func:`optax.adamw`.
    momentum: heavy-ball momentum :math:`\mu` on the search direction (0: none).
    nesterov: Nesterov form of that momentum.
    grafting: the grafted method, ``"adam"`` (default), ``"rmsprop"``,
      ``"adagrad"``, ``"sgd"`` or ``"frobenius"``.
    grafting_per_block: per-block norms (None: per block, as Meta).
    start_preconditioning_step: :math:`t_0`; None means ``root_every`` (Meta's
      default: the precondition frequency).
    use_bias_correction: divide :math:`M` by :math:`1-b_1^t`, and (with
      absolute ε and ``beta < 1``) the statistics by :math:`1-\beta^k` at
      root time (``stats_bias_correction`` of :func:`scale_by_shampoo4`).
    moment_bits: keyword-only; None keeps the heavy-ball momentum in float32,
      8 or 4 stores it quantized (:mod:`optax_shampoo4.moments`); the grafting
      accumulators inside :func:`scale_by_shampoo4` stay float32.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, optax_shampoo4 as s4
    >>> opt = s4.distributed_shampoo4(1e-3, weight_decay=1e-4)
    >>> state = opt.init({"w": jnp.zeros((8, 8))})

  References:
    Shi et al., `A Distributed Data-Parallel PyTorch Implementation of the
    Distributed Shampoo Optimizer for Training Neural Networks At-Scale
    <https://arxiv.org/abs/2309.06497>`_, 2023.
  """
  options.check_alias_options(learning_rate, weight_decay=weight_decay, moment_bits=moment_bits)
  validation.check_range("momentum", momentum, 0.0, 1.0)  # moments.trace checks it as `decay`, in [0, 1]
  keep_root, basis_bits, rectify_steps = ds_state_layout(state_format, root_method, store_root, bits, bjorck_steps)
  start = root_every if start_preconditioning_step is None else start_preconditioning_step
  shampoo = scale_by_shampoo4(
      max_order=max_order, beta=beta, epsilon=epsilon, stats_every=stats_every, root_every=root_every,
      state_format=state_format, bits=basis_bits, mapping=mapping, quant_block=quant_block,
      min_quant_order=min_quant_order, bjorck_steps=rectify_steps, root_method=root_method,
      refresh_method=refresh_method, qr_iterations=qr_iterations, refresh_tol=refresh_tol, mesh=mesh,
      mesh_axis=mesh_axis, grafting=grafting, grafting_eps=eps, grafting_beta2=b2,
      grafting_per_block=grafting_per_block, start_preconditioning_step=start, combine=combine,
      store_root=keep_root, epsilon_mode=epsilon_mode, stats_bias_correction=use_bias_correction,
      precondition_1d=precondition_1d, precision=precision, quant_damping=quant_damping,
      head_fraction=head_fraction, head_bits=head_bits, tail_rectify=tail_rectify, filter_beta=b1,
      filter_bias_correction=use_bias_correction)
  return optax.chain(shampoo, optax.add_decayed_weights(weight_decay, mask),
                     moments.trace(decay=momentum, nesterov=nesterov, bits=moment_bits),
                     optax.scale_by_learning_rate(learning_rate))


def ds_state_layout(state_format: Any, root_method: Any, store_root: options.StoreRoot | None, bits: int | None,
                    bjorck_steps: tuple[int, int] | None) -> tuple[options.StoreRoot, int | None, tuple[int, int]]:
  """``(store_root, bits, bjorck_steps)`` of :func:`distributed_shampoo4`, its ``None`` defaults resolved.

  With ``store_root=None`` and ``bits=None``, an eigen-form state (``state_format="eigen"``, roots
  from the eigenpairs) gets the default layout: no stored root and an 8-bit basis, with
  ``bjorck_steps=(1, 0)`` unless given. Otherwise ``store_root=None`` stores the roots,
  ``bjorck_steps=None`` is ``(1, 4)`` and ``bits=None`` the transform's default (4). The values are
  validated by :func:`~optax_shampoo4.scale_by_shampoo4`.

  Example:
    >>> from optax_shampoo4.reference_aliases import ds_state_layout
    >>> ds_state_layout("eigen", None, None, None, None)
    (False, 8, (1, 0))
    >>> ds_state_layout("fp32", None, None, None, None)
    (True, None, (1, 4))
  """
  if store_root is None and bits is None and state_format == "eigen" and root_method in (None, "eigen"):
    return False, DS_BASIS_BITS, DS_BJORCK_STEPS if bjorck_steps is None else bjorck_steps
  return True if store_root is None else store_root, bits, (1, 4) if bjorck_steps is None else bjorck_steps


def soap4(
    learning_rate: optax.ScalarOrSchedule = 3e-3,
    b1: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.95,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.01,
    mask: Any | Callable[[optax.Params], Any] | None = None,
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
    moment_bits: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    mesh_axis: str = "data",
    project_nu: bool | None = None,
    head_fraction: float | None = None,
    statistic: options.SoapStatistic = "refresh",
    precision: options.Precision = options.DEFAULT_PRECISION,
    tail_rectify: options.TailRectify = options.DEFAULT_TAIL_RECTIFY,
    head_bits: int | None = None,
    mid_fraction: float | None = None,
    carry: options.SoapCarry = options.DEFAULT_SOAP_CARRY,
) -> optax.GradientTransformationExtraArgs:
  r"""SOAP with a 4-bit eigenbasis, decoupled weight decay and a learning rate.

  .. math:: W \leftarrow W - \eta\,(N + \lambda W)

  where :math:`N` is the output of :func:`~optax_shampoo4.scale_by_soap4`
  (Adam in the eigenbasis of Shampoo's factors). The defaults are the SOAP
  reference's (lr 3e-3, betas 0.95, eps 1e-8, weight decay 0.01, a basis
  refresh every 10 steps).

  Keyword-only arguments ``shampoo_beta``, ``precondition_every``, ``max_order``, ``max_precond_dim``,
  ``state_format``, ``bits``, ``mapping``, ``quant_block``, ``min_quant_order``, ``bjorck_steps``, ``mesh``,
  ``mesh_axis``, ``project_nu``, ``head_fraction``, ``head_bits``, ``mid_fraction``, ``statistic``,
  ``precision``, ``tail_rectify``, ``carry``: passed to :func:`~optax_shampoo4.scale_by_soap4` (same defaults).

  Args:
    learning_rate: a float or an optax schedule.
    b1, b2, eps: Adam's moment decays and denominator epsilon.
    weight_decay: decoupled weight decay :math:`\lambda`.
    mask: which parameters get weight decay (tree of bools or a callable).
    moment_bits: keyword-only; None (float32), 8 or 4: bits of the stored
      Adam moments (see :func:`~optax_shampoo4.scale_by_soap4`).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, optax_shampoo4 as s4
    >>> opt = s4.soap4(3e-3, precondition_every=10)
    >>> state = opt.init({"w": jnp.zeros((8, 8))})
  """
  soap = scale_by_soap4(b1, b2, eps, shampoo_beta=shampoo_beta, precondition_every=precondition_every,
                        max_order=max_order, max_precond_dim=max_precond_dim, state_format=state_format,
                        bits=bits, mapping=mapping, quant_block=quant_block, min_quant_order=min_quant_order,
                        bjorck_steps=bjorck_steps, mesh=mesh, mesh_axis=mesh_axis, moment_bits=moment_bits,
                        project_nu=project_nu, head_fraction=head_fraction, statistic=statistic, precision=precision,
                        tail_rectify=tail_rectify, head_bits=head_bits, mid_fraction=mid_fraction,
                        carry=carry)
  options.check_alias_options(learning_rate, weight_decay=weight_decay)
  return optax.chain(
      soap,
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
