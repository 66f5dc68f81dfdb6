r"""Grafting: the step size of the Shampoo direction, borrowed from another optimizer.

Shampoo's preconditioned direction :math:`P_S = \hat L X \hat R` has a good
direction but a poorly scaled norm, so it is rescaled to the norm of a simpler
optimizer's direction :math:`P_g` (the *grafted* method):

.. math::

  P = P_S \, \frac{\|P_g\|_F}{\|P_S\|_F + 10^{-12}}

with the norms per parameter tensor or per preconditioned block. ``X`` is what
Shampoo preconditions: the gradient, or its bias-corrected EMA (Distributed
Shampoo's "filtered gradient", see ``filter_beta`` in
:func:`~optax_shampoo4.scale_by_shampoo4`). The grafted directions:

=============  ==========================================================  ==========================
``grafting``   :math:`P_g`                                                 accumulator :math:`A`
=============  ==========================================================  ==========================
``frobenius``  :math:`X` (the 4-bit Shampoo paper; norms per tensor)        none
``sgd``        :math:`X` (Distributed Shampoo; norms per block)             none
``adagrad``    :math:`X / (\sqrt{A} + \epsilon_g)`                          :math:`A + G^2`
``rmsprop``    :math:`X / (\sqrt{A} + \epsilon_g)`                          :math:`\beta_2 A + (1-\beta_2) G^2`
``adam``       :math:`X / (\sqrt{A / (1-\beta_2^t)} + \epsilon_g)`         :math:`\beta_2 A + (1-\beta_2) G^2`
=============  ==========================================================  ==========================

The accumulator sees the raw gradient :math:`G`; only the second moment is
grafted (a first moment is shared with Shampoo through ``X``), as in
Distributed Shampoo. Accumulators are float32 trees shaped like the
parameters, so :func:`optax.tree.map_params` treats them as parameters.

References:
  Agarwal et al., `Disentangling Adaptive Gradient Methods from Learning Rates
  <https://arxiv.org/abs/2002.11803>`_, 2020.
  Shi et al., `A Distributed Data-Parallel PyTorch Implementation of the
  Distributed Shampoo Optimizer <https://arxiv.org/abs/2309.06497>`_, 2023.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_shampoo4 import validation

GRAFTING_TYPES = ("frobenius", "sgd", "adagrad", "rmsprop", "adam")
# Distributed Shampoo's defaults (its *GraftingConfig / *PreconditionerConfig classes).
_DEFAULT_EPS = 1e-10
_DEFAULT_BETA2 = {"rmsprop": 0.99, "adam": 0.999}
# Added to the preconditioned norm in the grafting ratio (as the reference code).
TINY = 1e-12


class GraftingState(NamedTuple):
  """Parameter-shaped state of grafting and gradient filtering.

  Attributes:
    second_moment: float32 tree shaped like the parameters, the grafted
      method's accumulator :math:`A` (None for ``frobenius`` / ``sgd``).
    first_moment: float32 tree shaped like the parameters, the EMA of the
      gradient that Shampoo preconditions (None without ``b1``).
  """

  second_moment: Any = None
  first_moment: Any = None


@dataclasses.dataclass(frozen=True)
class Grafting:
  r"""A resolved grafting configuration (see the module docstring).

  Attributes:
    kind: one of :data:`GRAFTING_TYPES`.
    eps: :math:`\epsilon_g` (may be traced).
    beta2: :math:`\beta_2` of ``rmsprop`` / ``adam`` (may be traced).
    per_block: take the norms per preconditioned block instead of per tensor.
    b1: None, or the EMA decay :math:`\beta_1` of the filtered gradient :math:`X` (may be traced).
    bias_correction: divide the filtered gradient by :math:`1-\beta_1^t`.
  """

  kind: str
  eps: jax.typing.ArrayLike
  beta2: jax.typing.ArrayLike
  per_block: bool
  b1: jax.typing.ArrayLike | None = None
  bias_correction: bool = True

  @property
  def has_second_moment(self) -> bool:
    return self.kind in ("adagrad", "rmsprop", "adam")

  def init(self, params: Any) -> GraftingState:
    """Zero accumulators shaped like ``params`` (works on optax's params placeholder)."""
    zeros = lambda: jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)  # noqa: E731
    return GraftingState(zeros() if self.has_second_moment else None,
                         zeros() if self.b1 is not None else None)

  def update(self, state: GraftingState, grads: list, count: jax.Array, keep: jax.Array,
             treedef: Any) -> tuple[GraftingState, list]:
    """Folds the raw gradient into the state; returns it and, per leaf, :math:`X` (float32).

    Args:
      state: the previous state.
      grads: the gradient leaves.
      count: the step number, from 1.
      keep: scalar bool; where true the state is left unchanged (non-finite gradient).
      treedef: the gradient's tree structure (the state mirrors it).
    """
    grads32 = [g.astype(jnp.float32) for g in grads]
    second = state.second_moment
    if self.has_second_moment:
      old = treedef.flatten_up_to(second)
      squares = [g * g for g in grads32]
      if self.kind == "adagrad":
        new = [a + s for a, s in zip(old, squares)]
      else:
        beta2 = jnp.asarray(self.beta2, jnp.float32)
        new = [beta2 * a + (1.0 - beta2) * s for a, s in zip(old, squares)]
      second = treedef.unflatten([jnp.where(keep, a, n) for a, n in zip(old, new)])
    first, filtered = state.first_moment, grads32
    if self.b1 is not None:
      b1 = jnp.asarray(self.b1, jnp.float32)
      old = treedef.flatten_up_to(first)
      new = [b1 * m + (1.0 - b1) * g for m, g in zip(old, grads32)]
      filtered = new
      if self.bias_correction:
        correction = 1.0 - b1 ** count.astype(jnp.float32)
        filtered = [m / correction for m in new]
      first = treedef.unflatten([jnp.where(keep, m, n) for m, n in zip(old, new)])
    return GraftingState(second, first), filtered

  def directions(self, state: GraftingState, filtered: list, count: jax.Array, treedef: Any) -> list:
    """Per leaf, the grafted method's direction :math:`P_g` (float32)."""
    if not self.has_second_moment:
      return filtered
    eps = jnp.asarray(self.eps, jnp.float32)
    correction = jnp.ones([], jnp.float32)
    if self.kind == "adam":
      correction = 1.0 - jnp.asarray(self.beta2, jnp.float32) ** count.astype(jnp.float32)
    accumulators = treedef.flatten_up_to(state.second_moment)
    return [x / (jnp.sqrt(a / correction) + eps) for x, a in zip(filtered, accumulators)]


def resolve(grafting: str, eps: Any, beta2: Any, per_block: bool | None, b1: Any = None,
            bias_correction: bool = True) -> Grafting:
  """Validates the grafting arguments and fills in the defaults of ``None``.

  Defaults: ``eps`` 1e-10; ``beta2`` 0.99 (``rmsprop``) or 0.999 (``adam``);
  ``per_block`` False for ``frobenius`` (the paper) and True for the others
  (Distributed Shampoo).
  """
  if grafting not in GRAFTING_TYPES:
    raise ValueError(f"grafting must be one of {GRAFTING_TYPES}, got grafting={grafting!r}")
  if per_block is None:
    per_block = grafting != "frobenius"
  if not isinstance(per_block, bool):
    raise TypeError(f"grafting_per_block must be a bool or None, got grafting_per_block={per_block!r}")
  if not isinstance(bias_correction, bool):
    raise TypeError(f"filter_bias_correction must be a bool, got filter_bias_correction={bias_correction!r}")
  eps = _DEFAULT_EPS if eps is None else eps
  validation.check_range("grafting_eps", eps, 0.0, math.inf)
  beta2 = _DEFAULT_BETA2.get(grafting, 0.0) if beta2 is None else beta2
  validation.check_range("grafting_beta2", beta2, 0.0, 1.0)
  if b1 is not None:
    validation.check_range("filter_beta", b1, 0.0, 1.0)
  return Grafting(grafting, eps, beta2, per_block, b1, bias_correction)


def graft(preconditioned: jax.Array, grafted: jax.Array) -> jax.Array:
  """``preconditioned`` rescaled to the Frobenius norm of ``grafted``.

  Where ``preconditioned`` is not finite (a root overflowed on a vanishing
  statistic) the grafted direction itself is returned.
  """
  rescaled = preconditioned * (safe_norm(grafted) / (safe_norm(preconditioned) + TINY))
  return jnp.where(jnp.all(jnp.isfinite(rescaled)), rescaled, grafted)


def safe_norm(x: jax.Array) -> jax.Array:
  """Frobenius norm that neither overflows (``‖x‖ > ~1.8e19`` in float32) nor divides by a subnormal.

  XLA may flush subnormals to zero, so a peak below the smallest normal
  number is not divided by (such an ``x`` has norm ~0 anyway).
  """
  peak = jnp.max(jnp.abs(x)) if x.size else jnp.zeros([], x.dtype)
  safe_peak = jnp.where(peak >= jnp.finfo(x.dtype).tiny, peak, 1.0)
  return safe_peak * jnp.linalg.norm(x / safe_peak)
