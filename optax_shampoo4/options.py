r"""The options of the optimizers, resolved and validated once.

Every factory (:func:`~optax_shampoo4.scale_by_shampoo4`,
:func:`~optax_shampoo4.scale_by_soap4`) turns its keyword arguments into a
frozen :class:`ShampooOptions` / :class:`SoapOptions` with ``from_kwargs``:
each ``None`` default is replaced by its value (the ``DEFAULT_*`` constants
below) and every argument is checked, so a bad one raises a ``ValueError`` or
``TypeError`` naming the argument and its value at construction, never under
``jit``. The step functions then read resolved attributes only.

Shape-fixing options (``max_order``, ``bits``, ``quant_block``, ...) default
to None in the signatures because :func:`optax.inject_hyperparams` turns every
int/float argument into an array, but leaves None alone; options marked *may
be injected* (``beta``, ``stats_every``, ...) may be arrays, even traced ones,
and are checked only when concrete.

**Names that mean different things in different places.**

* ``state_format="fp32"``: in Shampoo, dense float32 statistics and roots
  (:class:`~optax_shampoo4.factor_state.MatrixFactors`, the paper's 32-bit
  baseline); in SOAP, the same eigen-pairs as its ``"eigen"`` format
  (:class:`~optax_shampoo4.factor_state.EigenFactors`) with float32
  eigenvectors. In both, "fp32" means *nothing quantized*.
* ``"eigen"`` names a ``state_format`` (store eigenvalues plus quantized
  eigenvectors) and a ``root_method`` (form :math:`\hat L = V(\Lambda +
  \epsilon\lambda_{\max} I)^{-1/4}V^\top` from those stored eigenpairs);
  ``root_method="eigen"`` needs ``state_format="eigen"``.
* ``eps``: the denominator constant of the *base* method of an alias
  (Adam's in :func:`~optax_shampoo4.adamw_shampoo4` and
  :func:`~optax_shampoo4.soap4`, Adagrad's in
  :func:`~optax_shampoo4.adagrad_shampoo4`, the grafted Adam's or
  RMSprop's, i.e. ``grafting_eps``, in
  :func:`~optax_shampoo4.distributed_shampoo4`); ``epsilon`` is always
  Shampoo's relative damping of the statistics.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Literal, Union, get_args

import jax
import numpy as np
from jax.typing import ArrayLike

from optax_shampoo4 import factors as fct
from optax_shampoo4 import grafting as grafting_lib
from optax_shampoo4 import linalg, moment_storage, sharding, validation
from optax_shampoo4 import quantization as qz

StateFormat = Literal["eigen", "naive", "fp32"]
SoapStateFormat = Literal["eigen", "fp32"]
SoapStatistic = Literal["refresh", "dense"]
# What SOAP's moments are carried into a refreshed basis by (scale_by_soap4's ``carry``).
SoapCarry = Literal["refreshed", "decoded"]
RootMethod = Literal["eigen", "newton", "jorge", "eigh"]
RefreshMethod = Literal["qr", "eigh", "adaptive"]
Combine = Literal["shampoo", "caspr"]
Mapping = Literal["linear2", "dynamic_tree", "linear"]
GraftingType = Literal["frobenius", "sgd", "adagrad", "rmsprop", "adam"]
EpsilonMode = Literal["relative", "absolute"]
Precision = Literal["highest", "high", "default"]
# What of the inverse roots a Shampoo state keeps: all (True), nothing (False) or their eigenvalues.
STORE_ROOT_EIGVALS = "eigvals"
StoreRoot = Union[bool, Literal["eigvals"]]

COMBINES = get_args(Combine)
EPSILON_MODES = get_args(EpsilonMode)
SOAP_FORMATS = get_args(SoapStateFormat)
SOAP_STATISTICS = get_args(SoapStatistic)
SOAP_CARRIES = get_args(SoapCarry)
TailRectify = Literal["bjorck", "qr", "qr_every_step"]
TAIL_RECTIFY = get_args(TailRectify)

# Chosen by measurement (docs: guides/refresh_and_variants); the paper's refresh is refresh_method="qr".
DEFAULT_REFRESH_METHOD: RefreshMethod = "adaptive"
DEFAULT_REFRESH_TOL = 1e-3
DEFAULT_QR_ITERATIONS = 1
# Defaults of the shape-fixing options, which default to None in the signatures.
DEFAULT_MAX_ORDER = 1024
DEFAULT_BITS = 4
DEFAULT_QUANT_BLOCK = 64
DEFAULT_MIN_QUANT_ORDER = 64
# SOAP's (the reference's precondition_frequency and max_precond_dim).
DEFAULT_PRECONDITION_EVERY = 10
DEFAULT_MAX_PRECOND_DIM = 10000
DEFAULT_HEAD_FRACTION = 1 / 8  # measured: benchmarks/illcond.py, docs/results/illcond.md
HEAD_BITS = (8, 16)
DEFAULT_HEAD_BITS = 16  # measured: benchmarks/soap_head_bits.py, docs/results/illcond.md
DEFAULT_MID_FRACTION = 1 / 8  # 8-bit rows after the head; measured as the head bits
DEFAULT_TAIL_RECTIFY = "bjorck"
# Shampoo rectifies at its refreshes only (SOAP's "qr_every_step" concerns the every-step rotations).
ShampooTailRectify = Literal["bjorck", "qr"]
SHAMPOO_TAIL_RECTIFY = get_args(ShampooTailRectify)
# The per-step products' precision (linalg.step_matmul); the refresh maths is always HIGHEST.
DEFAULT_PRECISION: Precision = "highest"
# "refreshed" measured against it: benchmarks/soap_carry.py, docs/results/illcond.md.
DEFAULT_SOAP_CARRY: SoapCarry = "decoded"


def check_precision(precision: Any) -> Precision:
  """``precision`` checked against :data:`~optax_shampoo4.linalg.STEP_PRECISIONS` (None: the default)."""
  precision = DEFAULT_PRECISION if precision is None else precision
  validation.check_choice("precision", precision, linalg.STEP_PRECISIONS)
  return precision


def _root_method(root_method: Any, state_format: str, epsilon_mode: str = "relative") -> RootMethod:
  """The resolved root method (None: ``"eigen"`` for the eigen format, else ``"newton"``, or ``"eigh"``
  with absolute ε, where Newton stalls on near-singular statistics)."""
  if root_method is None:
    return "eigen" if state_format == "eigen" else ("eigh" if epsilon_mode == "absolute" else "newton")
  if root_method not in fct.ROOT_METHODS:
    raise ValueError(f"root_method must be one of {fct.ROOT_METHODS} or None, got root_method={root_method!r}")
  if root_method == "eigen" and state_format != "eigen":
    raise ValueError(
        f"root_method='eigen' needs state_format='eigen' (the {state_format!r} format keeps no "
        f"eigenvectors; it uses 'newton'), got root_method={root_method!r}")
  if root_method == "eigh" and state_format == "eigen":
    raise ValueError("root_method='eigh' decomposes a dense statistic: use it with state_format='naive' or "
                     f"'fp32' (the 'eigen' format has root_method='eigen'), got state_format={state_format!r}")
  if root_method == "jorge" and state_format == "eigen":
    raise ValueError(
        "root_method='jorge' keeps only the inverse roots (no eigenvectors): use it with "
        f"state_format='naive' (4-bit root) or 'fp32', got state_format={state_format!r}")
  return root_method


def _check_jorge_beta(beta: Any, root_method: str) -> None:
  """Jorge's update scales by ``(1 - beta) / beta``: ``beta`` must be in (0, 1) (0 divides, 1 never moves)."""
  number = validation.concrete_float("beta", beta)
  if root_method == "jorge" and number is not None and not 0.0 < number < 1.0:
    raise ValueError(f"root_method='jorge' needs beta in (0, 1): its step is (1 - beta) / beta times the "
                     f"gram term, got beta={beta!r}")


def _check_store_root(store_root: Any, state_format: str, root_method: str) -> StoreRoot:
  """``store_root`` checked: True, False or ``"eigvals"`` (the last two form the roots from eigenpairs)."""
  if isinstance(store_root, str):
    if store_root != STORE_ROOT_EIGVALS:
      raise TypeError(f"store_root must be a bool or {STORE_ROOT_EIGVALS!r}, got store_root={store_root!r}")
  else:
    store_root = validation.check_bool("store_root", store_root)
  if store_root is not True and (state_format != "eigen" or root_method != "eigen"):
    raise ValueError(
        f"store_root={store_root!r} forms the roots from stored eigenvectors: it needs state_format='eigen' and "
        f"root_method='eigen' (or None), got state_format={state_format!r}, root_method={root_method!r}")
  return store_root


def _quantization(bits: Any, mapping: Any, quant_block: Any, min_quant_order: Any) -> tuple[int, Mapping, int, int]:
  """``(bits, mapping, quant_block, min_quant_order)`` resolved and checked."""
  bits = validation.static_int("bits", bits, DEFAULT_BITS, 1)
  quant_block = validation.static_int("quant_block", quant_block, DEFAULT_QUANT_BLOCK, 2)
  min_quant_order = validation.static_int("min_quant_order", min_quant_order, DEFAULT_MIN_QUANT_ORDER, 1)
  qz.validate_mapping_bits(mapping, bits)
  qz.validate_block(quant_block, bits, "quant_block")
  return bits, mapping, quant_block, min_quant_order


@dataclasses.dataclass(frozen=True)
class ShampooOptions:
  """The resolved options of :func:`~optax_shampoo4.scale_by_shampoo4` (see its arguments).

  Build with :meth:`from_kwargs`. ``beta``, ``epsilon``, ``stats_every``,
  ``root_every``, ``refresh_tol``, ``start_preconditioning_step`` and the
  grafting floats may be (injected) arrays; everything else is static.
  """

  max_order: int
  beta: ArrayLike
  epsilon: ArrayLike
  stats_every: ArrayLike
  root_every: ArrayLike
  state_format: StateFormat
  bits: int
  mapping: Mapping
  quant_block: int
  min_quant_order: int
  bjorck_steps: tuple[int, int]
  root_method: RootMethod
  refresh_method: RefreshMethod
  qr_iterations: int
  refresh_tol: ArrayLike
  mesh: jax.sharding.Mesh | None
  mesh_axis: str
  grafting: grafting_lib.Grafting
  start_preconditioning_step: ArrayLike | None
  combine: Combine
  store_root: StoreRoot
  epsilon_mode: EpsilonMode = "relative"
  stats_bias_correction: bool = False
  precondition_1d: bool = False
  precision: Precision = DEFAULT_PRECISION
  quant_damping: ArrayLike = 0.0
  head_fraction: float = 0.0
  head_bits: int = DEFAULT_HEAD_BITS
  tail_rectify: ShampooTailRectify = DEFAULT_TAIL_RECTIFY

  @classmethod
  def from_kwargs(cls, *, max_order: int | None = None, beta: ArrayLike = 0.95, epsilon: ArrayLike = 1e-6,
                  stats_every: ArrayLike = 100, root_every: ArrayLike = 500, state_format: StateFormat = "eigen",
                  bits: int | None = None, mapping: Mapping = "linear2", quant_block: int | None = None,
                  min_quant_order: int | None = None, bjorck_steps: tuple[int, int] = (1, 4),
                  root_method: RootMethod | None = None, refresh_method: RefreshMethod = DEFAULT_REFRESH_METHOD,
                  qr_iterations: int | None = None, refresh_tol: ArrayLike = DEFAULT_REFRESH_TOL,
                  mesh: jax.sharding.Mesh | None = None, mesh_axis: str = "data",
                  grafting: GraftingType = "frobenius", grafting_eps: ArrayLike | None = None,
                  grafting_beta2: ArrayLike | None = None, grafting_per_block: bool | None = None,
                  start_preconditioning_step: ArrayLike | None = None, filter_beta: ArrayLike | None = None,
                  filter_bias_correction: bool = True, combine: Combine = "shampoo", store_root: StoreRoot = True,
                  epsilon_mode: EpsilonMode = "relative", stats_bias_correction: bool = False,
                  precondition_1d: bool = False, precision: Precision = DEFAULT_PRECISION,
                  quant_damping: ArrayLike = 0.0, head_fraction: float | None = None, head_bits: int | None = None,
                  tail_rectify: ShampooTailRectify = DEFAULT_TAIL_RECTIFY) -> ShampooOptions:
    """Resolves every None default and checks every argument (the factory's keywords)."""
    max_order = validation.static_int("max_order", max_order, DEFAULT_MAX_ORDER, 1)
    bits, mapping, quant_block, min_quant_order = _quantization(bits, mapping, quant_block, min_quant_order)
    validation.check_traceable_int("stats_every", stats_every, 1)
    validation.check_traceable_int("root_every", root_every, 1)
    validation.check_choice("state_format", state_format, fct.FORMATS)
    validation.check_range("beta", beta, 0.0, 1.0, high_inclusive=True)
    validation.check_range("epsilon", epsilon, 0.0, math.inf)
    validation.check_range("quant_damping", quant_damping, 0.0, 1.0)
    validation.check_choice("epsilon_mode", epsilon_mode, EPSILON_MODES)
    root_method = _root_method(root_method, state_format, epsilon_mode)
    _check_jorge_beta(beta, root_method)
    validation.check_choice("refresh_method", refresh_method, fct.REFRESH_METHODS)
    qr_iterations = validation.static_int("qr_iterations", qr_iterations, DEFAULT_QR_ITERATIONS, 1)
    validation.check_range("refresh_tol", refresh_tol, 0.0, 1.0, high_inclusive=True)
    validation.check_choice("combine", combine, COMBINES)
    if start_preconditioning_step is not None:
      validation.check_traceable_int("start_preconditioning_step", start_preconditioning_step, 0)
    sharding.validate_mesh(mesh, mesh_axis)
    return cls(max_order=max_order, beta=beta, epsilon=epsilon, stats_every=stats_every, root_every=root_every,
               state_format=state_format, bits=bits, mapping=mapping, quant_block=quant_block,
               min_quant_order=min_quant_order, bjorck_steps=validation.int_pair("bjorck_steps", bjorck_steps),
               root_method=root_method, refresh_method=refresh_method, qr_iterations=qr_iterations,
               refresh_tol=refresh_tol, mesh=mesh, mesh_axis=mesh_axis,
               grafting=grafting_lib.resolve(grafting, grafting_eps, grafting_beta2, grafting_per_block,
                                             filter_beta, filter_bias_correction),
               start_preconditioning_step=start_preconditioning_step, combine=combine,
               store_root=_check_store_root(store_root, state_format, root_method), epsilon_mode=epsilon_mode,
               stats_bias_correction=validation.check_bool("stats_bias_correction", stats_bias_correction),
               precondition_1d=validation.check_bool("precondition_1d", precondition_1d),
               precision=check_precision(precision), quant_damping=quant_damping,
               **_shampoo_head(head_fraction, head_bits, tail_rectify, bits, state_format))

  def factor_config(self) -> fct.FactorConfig:
    """The factor maths' settings (:class:`~optax_shampoo4.factor_state.FactorConfig`)."""
    return fct.FactorConfig(self.state_format, self.bits, self.mapping, self.quant_block, self.bjorck_steps,
                            self.root_method, refresh_method=self.refresh_method,
                            qr_iterations=self.qr_iterations, refresh_tol=self.refresh_tol,
                            jorge_damping=self.epsilon, epsilon_mode=self.epsilon_mode,
                            quant_damping=self.quant_damping, head_fraction=self.head_fraction,
                            head_bits=self.head_bits, tail_rectify=self.tail_rectify)


def _shampoo_head(head_fraction: Any, head_bits: Any, tail_rectify: Any, bits: int, state_format: str) -> dict:
  """Shampoo's row tiers checked: ``{head_fraction, head_bits, tail_rectify}`` (a head needs the eigen format)."""
  head_fraction = validation.static_fraction("head_fraction", head_fraction, 0.0)
  validation.check_choice("tail_rectify", tail_rectify, SHAMPOO_TAIL_RECTIFY)
  if head_fraction > 0 and state_format != "eigen":
    raise ValueError(f"head_fraction stores some eigenvectors in more bits: it needs state_format='eigen', got "
                     f"head_fraction={head_fraction!r} with state_format={state_format!r}")
  return dict(head_fraction=head_fraction, head_bits=_head_bits(head_bits, bits), tail_rectify=tail_rectify)


@dataclasses.dataclass(frozen=True)
class SoapOptions:
  """The resolved options of :func:`~optax_shampoo4.scale_by_soap4` (see its arguments).

  Build with :meth:`from_kwargs`. ``b1``, ``b2``, ``eps``, ``shampoo_beta``
  and ``precondition_every`` may be (injected) arrays; everything else is
  static. ``shampoo_beta`` stays None when it means its default (``soap_eigenbasis.statistic_beta``); ``project_nu``
  None resolves to True for ``statistic="refresh"`` and False for
  ``"dense"`` (the reference only permutes :math:`v`).
  """

  b1: ArrayLike
  b2: ArrayLike
  eps: ArrayLike
  shampoo_beta: ArrayLike | None
  precondition_every: ArrayLike
  max_order: int
  max_precond_dim: int
  state_format: SoapStateFormat
  bits: int
  mapping: Mapping
  quant_block: int
  min_quant_order: int
  bjorck_steps: tuple[int, int]
  mesh: jax.sharding.Mesh | None
  mesh_axis: str
  moment_bits: int | None
  project_nu: bool
  head_fraction: float
  statistic: SoapStatistic = "refresh"
  precision: Precision = DEFAULT_PRECISION
  tail_rectify: TailRectify = DEFAULT_TAIL_RECTIFY
  head_bits: int = DEFAULT_HEAD_BITS
  mid_fraction: float = DEFAULT_MID_FRACTION
  carry: SoapCarry = DEFAULT_SOAP_CARRY

  @classmethod
  def from_kwargs(cls, *, b1: ArrayLike = 0.95, b2: ArrayLike = 0.95, eps: ArrayLike = 1e-8,
                  shampoo_beta: ArrayLike | None = None, precondition_every: ArrayLike | None = None,
                  max_order: int | None = None, max_precond_dim: int | None = None,
                  state_format: SoapStateFormat = "eigen", bits: int | None = None, mapping: Mapping = "linear2",
                  quant_block: int | None = None, min_quant_order: int | None = None,
                  bjorck_steps: tuple[int, int] | None = None, mesh: jax.sharding.Mesh | None = None,
                  mesh_axis: str = "data", moment_bits: int | None = None, project_nu: bool | None = None,
                  head_fraction: float | None = None, statistic: SoapStatistic = "refresh",
                  precision: Precision = DEFAULT_PRECISION,
                  tail_rectify: TailRectify = DEFAULT_TAIL_RECTIFY, head_bits: int | None = None,
                  mid_fraction: float | None = None, carry: SoapCarry = DEFAULT_SOAP_CARRY) -> SoapOptions:
    """Resolves every None default and checks every argument (the factory's keywords)."""
    validation.check_range("b1", b1, 0.0, 1.0)
    validation.check_range("b2", b2, 0.0, 1.0)
    validation.check_range("eps", eps, 0.0, math.inf)
    if shampoo_beta is not None:
      validation.check_range("shampoo_beta", shampoo_beta, 0.0, 1.0)
    precondition_every = DEFAULT_PRECONDITION_EVERY if precondition_every is None else precondition_every
    validation.check_traceable_int("precondition_every", precondition_every, 1)
    max_order = validation.static_int("max_order", max_order, DEFAULT_MAX_ORDER, 1)
    max_precond_dim = validation.static_int("max_precond_dim", max_precond_dim, DEFAULT_MAX_PRECOND_DIM, 1)
    bits, mapping, quant_block, min_quant_order = _quantization(bits, mapping, quant_block, min_quant_order)
    moment_storage.check_moment_bits("moment_bits", moment_bits)
    validation.check_choice("state_format", state_format, SOAP_FORMATS)
    validation.check_choice("statistic", statistic, SOAP_STATISTICS)
    validation.check_choice("tail_rectify", tail_rectify, TAIL_RECTIFY)
    validation.check_choice("carry", carry, SOAP_CARRIES)
    project_nu = statistic == "refresh" if project_nu is None else validation.check_bool("project_nu", project_nu)
    sharding.validate_mesh(mesh, mesh_axis)
    head_fraction = validation.static_fraction("head_fraction", head_fraction, DEFAULT_HEAD_FRACTION)
    if bjorck_steps is None:  # tiered bases: each step projects the tiers, no Björck step needed
      bjorck_steps = (1, 0) if head_fraction > 0 and tail_rectify != "qr_every_step" else (1, 1)
    return cls(b1=b1, b2=b2, eps=eps, shampoo_beta=shampoo_beta, precondition_every=precondition_every,
               max_order=max_order, max_precond_dim=max_precond_dim, state_format=state_format, bits=bits,
               mapping=mapping, quant_block=quant_block, min_quant_order=min_quant_order,
               bjorck_steps=validation.int_pair("bjorck_steps", bjorck_steps), mesh=mesh, mesh_axis=mesh_axis,
               moment_bits=moment_bits, project_nu=project_nu, head_fraction=head_fraction,
               statistic=statistic, precision=check_precision(precision), tail_rectify=tail_rectify,
               head_bits=_head_bits(head_bits, bits),
               mid_fraction=validation.static_fraction("mid_fraction", mid_fraction, DEFAULT_MID_FRACTION),
               carry=carry)

  @property
  def quantized_from(self) -> int:
    """The smallest quantized factor order.

    ``min_quant_order``, or never (``sys.maxsize``) for ``state_format="fp32"``.
    """
    return self.min_quant_order if self.state_format == "eigen" else sys.maxsize

  def factor_config(self) -> fct.FactorConfig:
    """SOAP's factor settings (:func:`soap_factor_config`)."""
    return soap_factor_config(self.bits, self.mapping, self.quant_block, self.bjorck_steps, self.head_fraction,
                              self.tail_rectify, self.head_bits, self.mid_fraction)


def soap_factor_config(bits: int, mapping: str, quant_block: int, bjorck_steps: tuple[int, int],
                       head_fraction: float = 0.0, tail_rectify: str = "bjorck",
                       head_bits: int = DEFAULT_HEAD_BITS, mid_fraction: float = 0.0) -> fct.FactorConfig:
  """SOAP's factors: the ``"eigen"`` format with eigen roots, refreshed by one QR step, not re-sorted.

  SOAP sorts the eigenpairs before the QR step (``row_order`` of
  :func:`~optax_shampoo4.factors.update_stats`), so the refreshed columns
  stay aligned with the carried moments' coordinates.
  """
  return fct.FactorConfig("eigen", bits, mapping, quant_block, (int(bjorck_steps[0]), int(bjorck_steps[1])),
                          "eigen", sort_refreshed=False, head_fraction=float(head_fraction), tail_rectify=tail_rectify,
                          head_bits=head_bits, mid_fraction=float(mid_fraction))


def _head_bits(value: Any, bits: int) -> int:
  """The head rows' bits: one of :data:`HEAD_BITS`, more than the tail's ``bits`` (None: the default)."""
  if value is None:
    return DEFAULT_HEAD_BITS
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value not in HEAD_BITS:
    raise ValueError(f"head_bits must be one of {HEAD_BITS} or None, got head_bits={value!r}")
  if value <= bits:
    raise ValueError(f"head_bits must exceed bits (the tail's), got head_bits={value!r} with bits={bits!r}")
  return int(value)


def check_alias_options(learning_rate: Any, *, weight_decay: Any = 0.0, moment_bits: Any = None) -> None:
  """Checks the options an alias adds to its transforms (the rest are checked where they are used).

  ``moment_bits`` is forwarded as ``bits`` to :mod:`optax_shampoo4.moments`,
  so it is checked here under the alias' name.
  """
  validation.check_learning_rate(learning_rate)
  validation.check_range("weight_decay", weight_decay, 0.0, math.inf)
  moment_storage.check_moment_bits("moment_bits", moment_bits)
