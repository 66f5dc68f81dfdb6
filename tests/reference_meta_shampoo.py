r"""Float64 numpy transcription of Meta's Distributed Shampoo, default root-inverse preconditioner.

Source: Shi et al., *A Distributed Data-Parallel PyTorch Implementation of the
Distributed Shampoo Optimizer* (https://arxiv.org/abs/2309.06497), reference
code github.com/facebookresearch/optimizers at f606606:
``distributed_shampoo/distributed_shampoo.py`` (``_group_step_body``,
``_compute_search_directions``, ``_compute_filtered_grad_list``,
``_precondition_and_grafting``, ``_apply_weight_decay``),
``preconditioner/shampoo_preconditioner_list.py`` (``update_preconditioners``,
``_update_factor_matrices``, ``amortized_computation``,
``_get_inverse_roots_from_override``), ``preconditioner/matrix_functions.py``
(``matrix_inverse_root`` with ``DefaultEigenConfig``, ``DefaultPerturbationConfig``),
``preconditioner/adagrad_preconditioner_list.py`` (Adam grafting) and
``utils/shampoo_utils.py`` (``merge_small_dims``, ``multi_dim_split``).
Written from the description of that code, in float64, for tests and
benchmarks; not part of the library. Single device, no iterate averaging,
``beta3 = beta1``, no trace scaling, decoupled weight decay.

At step :math:`t` (from 1), per parameter: the gradient is reshaped by
``merge_small_dims`` (size-1 dimensions dropped; adjacent dimensions merged,
last first, while their product stays ``<= max_preconditioner_dim`` and the
rank exceeds ``target_dimensionality``; Meta's default target is 1, so a small
matrix becomes one vector) and cut into blocks of at most
``max_preconditioner_dim`` along each dimension. For every block of order
:math:`p` and every dimension :math:`k`:

.. math::

  F_k &\leftarrow \beta_2 F_k + w\, B_{(k)} B_{(k)}^\top, \quad F_k(0) = 0,
    \quad w = 1 \text{ if } \beta_2 = 1 \text{ else } 1 - \beta_2 \\
  \text{at root steps}:\ & \lambda, U = \mathrm{eigh}(F_k / c_t + \epsilon I),
    c_t = 1 - \beta_2^t \text{ (1 when } \beta_2 = 1),\
    \lambda \leftarrow \lambda - \lambda_{\min} + \epsilon \text{ if } \lambda_{\min} < \epsilon,\
    R_k = U \lambda^{-1/(2p)} U^\top

(``R_k = I`` until the first root step). Root steps: :math:`t` = ``start``, or
:math:`t \equiv 0 \pmod f` and :math:`t >` ``start`` (``start = -1`` means
:math:`f`). The filtered gradient :math:`X = M / (1-\beta_1^t)` with
:math:`M \leftarrow \beta_1 M + (1-\beta_1) G` (:math:`X = G` when
:math:`\beta_1 = 0`). Adam grafting: :math:`A \leftarrow \beta_g A + (1-\beta_g)
G^2`, :math:`P_g = X / (\sqrt{A/(1-\beta_g^t)} + \epsilon_g)`. Before ``start``
(with grafting) the direction is :math:`P_g`; from it on, per block
:math:`P = (X \times_k R_k)\, \|P_g\| / (\|X \times_k R_k\| + 10^{-16})`.
Then :math:`P \leftarrow P + \lambda W` and :math:`W \leftarrow W - \eta P`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import reference_common
from reference_common import outer_product


@dataclasses.dataclass(frozen=True)
class MetaConfig:
  """Meta's constructor defaults, plus ``grafting=("adam", beta2, eps)`` or None."""

  lr: float = 1e-2
  b1: float = 0.9
  b2: float = 1.0
  epsilon: float = 1e-12
  weight_decay: float = 0.0
  max_preconditioner_dim: int = 1024
  precondition_frequency: int = 1
  start_preconditioning_step: int = -1
  use_bias_correction: bool = True
  grafting: tuple | None = None
  target_dimensionality: float = 1

  @property
  def start(self) -> int:
    return self.precondition_frequency if self.start_preconditioning_step == -1 else self.start_preconditioning_step


@dataclasses.dataclass
class MetaState:
  """One parameter's state: per block, its factors and inverse roots (one per block dimension)."""

  step: int
  filtered: np.ndarray
  graft_acc: np.ndarray | None
  factors: list
  roots: list


def merge_small_dims(shape: tuple[int, ...], threshold: int, target: float) -> tuple[int, ...]:
  """Meta's ``merge_small_dims``: squeeze size-1 dims, merge from the last dim while allowed."""
  if 0 in shape:
    return (0,)
  if target == math.inf:
    return tuple(n for n in shape if n != 1) or (1,)
  squeezed = [n for n in reversed(shape) if n != 1] or [1]
  merged = [squeezed[0]]
  for processed, size in enumerate(squeezed[1:], start=1):
    if len(merged) + len(squeezed) - processed > target and merged[-1] * size <= threshold:
      merged[-1] *= size
    else:
      merged.append(size)
  return tuple(reversed(merged))


def block_slices(shape: tuple[int, ...], size: int) -> list[tuple[slice, ...]]:
  """``multi_dim_split``: blocks of at most ``size`` along every dimension, row-major order."""
  ranges = [[slice(i, min(i + size, n)) for i in range(0, n, size)] for n in shape]
  return list(itertools.product(*ranges))


def blocks_of(x: np.ndarray, cfg: MetaConfig) -> list[np.ndarray]:
  merged = x.reshape(merge_small_dims(x.shape, cfg.max_preconditioner_dim, cfg.target_dimensionality))
  return [merged[s] for s in block_slices(merged.shape, cfg.max_preconditioner_dim)]


def from_blocks(blocks: list[np.ndarray], shape: tuple[int, ...], cfg: MetaConfig) -> np.ndarray:
  merged_shape = merge_small_dims(shape, cfg.max_preconditioner_dim, cfg.target_dimensionality)
  out = np.zeros(merged_shape)
  for s, b in zip(block_slices(merged_shape, cfg.max_preconditioner_dim), blocks):
    out[s] = b
  return out.reshape(shape)


def init_state(param: np.ndarray, cfg: MetaConfig) -> MetaState:
  blocks = blocks_of(np.asarray(param, np.float64), cfg)
  factors = [[np.zeros((n, n)) for n in b.shape] for b in blocks]
  roots = [[np.eye(n) for n in b.shape] for b in blocks]
  acc = np.zeros(param.shape) if cfg.grafting is not None else None
  return MetaState(0, np.zeros(param.shape), acc, factors, roots)




def inverse_root(factor: np.ndarray, bias_correction: float, epsilon: float, root: int) -> np.ndarray:
  """``matrix_inverse_root`` (eigh, perturbation before the decomposition) of ``factor / c``."""
  lam, vectors = np.linalg.eigh(factor / bias_correction + epsilon * np.eye(factor.shape[0]))
  if lam.min() < epsilon:
    lam = lam - lam.min() + epsilon
  return (vectors * lam ** (-1.0 / root)) @ vectors.T


def precondition_block(block: np.ndarray, roots: list) -> np.ndarray:
  for r in roots:
    block = np.tensordot(block, r, axes=([0], [0]))
  return block


def update_factors(state: MetaState, grad_blocks: list, cfg: MetaConfig, step: int) -> None:
  """Folds the gradient into every factor; refreshes the roots at root steps (in place)."""
  weight = 1.0 if cfg.b2 == 1.0 else 1.0 - cfg.b2
  for factors, block in zip(state.factors, grad_blocks):
    for k in range(block.ndim):
      factors[k] = cfg.b2 * factors[k] + weight * outer_product(block, k)
  root_step = (step % cfg.precondition_frequency == 0 and step > cfg.start) or step == cfg.start
  if not root_step:
    return
  correction = 1.0 - cfg.b2**step if cfg.use_bias_correction and cfg.b2 < 1.0 else 1.0
  for factors, roots in zip(state.factors, state.roots):
    order = len(factors)
    for k, f in enumerate(factors):
      roots[k] = inverse_root(f, correction, cfg.epsilon, 2 * max(order, 1))


def meta_step(param: np.ndarray, grad: np.ndarray, state: MetaState,
              cfg: MetaConfig) -> tuple[np.ndarray, MetaState]:
  """One call of Meta's ``step`` for one parameter; returns the new parameter and state (a copy)."""
  param, grad = np.asarray(param, np.float64), np.asarray(grad, np.float64)
  state = dataclasses.replace(state, factors=[list(f) for f in state.factors], roots=[list(r) for r in state.roots])
  step = state.step + 1
  update_factors(state, blocks_of(grad, cfg), cfg, step)
  acc = state.graft_acc
  if cfg.grafting is not None:
    _, g_beta2, _ = cfg.grafting
    acc = g_beta2 * acc + (1.0 - g_beta2) * grad**2
  filtered, x = state.filtered, grad
  if cfg.b1 != 0.0:
    filtered = cfg.b1 * filtered + (1.0 - cfg.b1) * grad
    x = filtered / (1.0 - cfg.b1**step) if cfg.use_bias_correction else filtered
  direction = search_direction(x, acc, state.roots, cfg, step)
  direction = direction + cfg.weight_decay * param
  new_state = MetaState(step, filtered, acc, state.factors, state.roots)
  return param - cfg.lr * direction, new_state


def search_direction(x: np.ndarray, acc: np.ndarray | None, roots: list, cfg: MetaConfig, step: int) -> np.ndarray:
  """Grafted Shampoo direction (or the grafted method alone before ``start``)."""
  grafted = None
  if cfg.grafting is not None:
    _, g_beta2, g_eps = cfg.grafting
    grafted = x / (np.sqrt(acc / (1.0 - g_beta2**step)) + g_eps)
    if step < cfg.start:
      return grafted
  x_blocks = blocks_of(x, cfg)
  out = []
  graft_blocks = blocks_of(grafted, cfg) if grafted is not None else [None] * len(x_blocks)
  for block, block_roots, g in zip(x_blocks, roots, graft_blocks):
    p = precondition_block(block, block_roots)
    if g is not None:
      p = p * (np.linalg.norm(g) / (np.linalg.norm(p) + 1e-16))
    out.append(p)
  return from_blocks(out, x.shape, cfg)


def run_meta(params: dict, grad_fn, steps: int, cfg) -> list[dict]:
  """``steps`` calls on a dict of arrays with ``grad_fn(params, call) -> grads`` (call from 0); returns the params after each call."""
  return reference_common.run_steps(params, grad_fn, steps, cfg, init_state, meta_step)
