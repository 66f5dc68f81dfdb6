r"""Float64 numpy transcription of the SOAP authors' optimizer, one parameter at a time.

Source: Vyas et al., *SOAP: Improving and Stabilizing Shampoo using Adam*
(https://arxiv.org/abs/2409.11321), reference code ``soap.py`` of
github.com/nikhilvyas/SOAP at commit a1e5535 (class ``SOAP``, methods ``step``,
``update_preconditioner``, ``get_orthogonal_matrix``,
``get_orthogonal_matrix_QR``, ``project``, ``project_back``), with
``merge_dims=False``, ``normalize_grads=False`` and ``data_format`` irrelevant
(no 4-D tensors here). Written from the description of that code, in float64,
for tests and benchmarks; it is not part of the library.

Per parameter :math:`W` with gradient :math:`G`, statistics :math:`S_k` (one per
rotated dimension :math:`k`), bases :math:`Q_k`, Adam moments :math:`m, v` in
the rotated space and Adam step counter :math:`t`:

* **First call**: :math:`S_k \leftarrow \mathrm{lerp}(0, G_{(k)} G_{(k)}^\top,
  1-\beta_s)`; :math:`Q_k` = eigenvectors of :math:`S_k + 10^{-30} I` by
  descending eigenvalue. No parameter update, no weight decay, :math:`t` stays 0.
* **Every later call**: :math:`G' = G \times_k Q_k^\top`; :math:`t \leftarrow t+1`;
  :math:`m \leftarrow \beta_1 m + (1-\beta_1) G'`,
  :math:`v \leftarrow \beta_2 v + (1-\beta_2) G'^2`;
  :math:`W \leftarrow W - \eta\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
  \big(\frac{m}{\sqrt v + \epsilon}\big) \times_k Q_k`; then
  :math:`W \leftarrow W - \eta\lambda W` (decoupled, after the step). Then
  ``update_preconditioner``: :math:`m \leftarrow m \times_k Q_k` (back to the
  original space); :math:`S_k \leftarrow \beta_s S_k + (1-\beta_s) G_{(k)}
  G_{(k)}^\top` (**every** call); if :math:`t \equiv 0 \pmod f`: per rotated
  dimension, :math:`o = \mathrm{argsort}_\downarrow \mathrm{diag}(Q_k^\top S_k Q_k)`,
  :math:`v` permuted along :math:`k` by :math:`o` (its only change),
  :math:`Q_k \leftarrow \mathrm{qr}(S_k Q_k[:, o]).Q`; finally
  :math:`m \leftarrow m \times_k Q_k^\top` (into the possibly new basis).

Rotated dimensions: every dimension of size ``<= max_precond_dim`` of a tensor
of rank >= 2; a 1-D tensor is rotated only with ``precondition_1d`` (the
reference's default is False: plain Adam). The sign of a QR or eigenvector
column is arbitrary; Adam in the rotated basis does not depend on it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import reference_common
from reference_common import outer_product


@dataclasses.dataclass(frozen=True)
class SoapConfig:
  """The reference's hyperparameters (its defaults; ``shampoo_beta=None`` means ``b2``)."""

  lr: float = 3e-3
  b1: float = 0.95
  b2: float = 0.95
  shampoo_beta: float | None = None
  eps: float = 1e-8
  weight_decay: float = 0.01
  precondition_frequency: int = 10
  max_precond_dim: int = 10000
  precondition_1d: bool = False
  correct_bias: bool = True

  @property
  def statistic_beta(self) -> float:
    return self.b2 if self.shampoo_beta is None or self.shampoo_beta < 0 else self.shampoo_beta


@dataclasses.dataclass
class SoapState:
  """One parameter's state; ``stats[k]`` / ``bases[k]`` are None for dimensions left unrotated."""

  step: int
  exp_avg: np.ndarray
  exp_avg_sq: np.ndarray
  stats: list
  bases: list | None = None


def rotated_dims(shape: tuple[int, ...], cfg: SoapConfig) -> list[bool]:
  """Which dimensions get a statistic and a basis (``init_preconditioner``)."""
  if len(shape) == 1:
    return [bool(cfg.precondition_1d and shape[0] <= cfg.max_precond_dim)]
  return [size <= cfg.max_precond_dim for size in shape]


def init_state(param: np.ndarray, cfg: SoapConfig) -> SoapState:
  zeros = np.zeros(param.shape, np.float64)
  stats = [np.zeros((n, n)) if rot else None for n, rot in zip(param.shape, rotated_dims(param.shape, cfg))]
  return SoapState(0, zeros.copy(), zeros.copy(), stats, None)


def project(x: np.ndarray, bases: list) -> np.ndarray:
  r""":math:`x \times_k Q_k^\top`: each rotated dimension contracted with its basis (columns)."""
  for basis in bases:
    x = np.tensordot(x, basis, axes=([0], [0])) if basis is not None else np.moveaxis(x, 0, -1)
  return x


def project_back(x: np.ndarray, bases: list) -> np.ndarray:
  r""":math:`x \times_k Q_k`: the inverse of :func:`project` (orthonormal bases)."""
  for basis in bases:
    x = np.tensordot(x, basis, axes=([0], [1])) if basis is not None else np.moveaxis(x, 0, -1)
  return x




def fold_statistics(stats: list, grad: np.ndarray, beta: float) -> list:
  """``lerp(S_k, outer_k(G), 1 - beta)`` for every rotated dimension."""
  return [None if s is None else s + (1.0 - beta) * (outer_product(grad, k) - s) for k, s in enumerate(stats)]


def eigh_bases(stats: list) -> list:
  """First bases: eigenvectors of each statistic (+1e-30 I), by descending eigenvalue."""
  bases = []
  for s in stats:
    if s is None:
      bases.append(None)
      continue
    _, vectors = np.linalg.eigh(s + 1e-30 * np.eye(s.shape[0]))
    bases.append(vectors[:, ::-1].copy())
  return bases


def qr_refresh(stats: list, bases: list, exp_avg_sq: np.ndarray) -> tuple[list, np.ndarray]:
  """One power step + QR per rotated dimension, sorted first; ``v`` permuted along each sorted side."""
  new_bases = []
  for k, (s, q) in enumerate(zip(stats, bases)):
    if s is None:
      new_bases.append(None)
      continue
    estimate = np.diag(q.T @ s @ q)
    order = np.argsort(-estimate, kind="stable")
    exp_avg_sq = np.take(exp_avg_sq, order, axis=k)
    new_q, _ = np.linalg.qr(s @ q[:, order])
    new_bases.append(new_q)
  return new_bases, exp_avg_sq


def soap_step(param: np.ndarray, grad: np.ndarray, state: SoapState,
              cfg: SoapConfig) -> tuple[np.ndarray, SoapState]:
  """One call of the reference's ``step`` for one parameter; returns the new parameter and state."""
  param, grad = np.asarray(param, np.float64), np.asarray(grad, np.float64)
  beta_s = cfg.statistic_beta
  if state.bases is None:
    stats = fold_statistics(state.stats, grad, beta_s)
    return param, SoapState(0, state.exp_avg, state.exp_avg_sq, stats, eigh_bases(stats))
  bases, step = state.bases, state.step + 1
  rotated = project(grad, bases)
  exp_avg = cfg.b1 * state.exp_avg + (1.0 - cfg.b1) * rotated
  exp_avg_sq = cfg.b2 * state.exp_avg_sq + (1.0 - cfg.b2) * rotated**2
  step_size = cfg.lr
  if cfg.correct_bias:
    step_size *= np.sqrt(1.0 - cfg.b2**step) / (1.0 - cfg.b1**step)
  param = param - step_size * project_back(exp_avg / (np.sqrt(exp_avg_sq) + cfg.eps), bases)
  if cfg.weight_decay > 0.0:
    param = param - cfg.lr * cfg.weight_decay * param
  exp_avg = project_back(exp_avg, bases)
  stats = fold_statistics(state.stats, grad, beta_s)
  if step % cfg.precondition_frequency == 0:
    bases, exp_avg_sq = qr_refresh(stats, bases, exp_avg_sq)
  exp_avg = project(exp_avg, bases)
  return param, SoapState(step, exp_avg, exp_avg_sq, stats, bases)


def run_soap(params: dict, grad_fn, steps: int, cfg) -> list[dict]:
  """``steps`` calls on a dict of arrays with ``grad_fn(params, call) -> grads`` (call from 0); returns the params after each call."""
  return reference_common.run_steps(params, grad_fn, steps, cfg, init_state, soap_step)
