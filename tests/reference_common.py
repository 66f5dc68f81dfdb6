"""What the float64 transcriptions of the references share: the per-dimension outer product and the run loop."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def outer_product(x: np.ndarray, dim: int) -> np.ndarray:
  """``x`` contracted with itself over every dimension but ``dim`` (``G Gᵀ`` / ``Gᵀ G`` of a matrix)."""
  others = [k for k in range(x.ndim) if k != dim]
  return np.tensordot(x, x, axes=(others, others))


def run_steps(params: dict, grad_fn: Callable, steps: int, cfg: Any, init_state: Callable,
              step: Callable) -> list[dict]:
  """``steps`` calls of ``step(param, grad, state, cfg) -> (param, state)`` on each array of the dict ``params``,
  with ``grad_fn(params, call) -> grads`` (call from 0); returns the params after each call, in float64."""
  params = {name: np.asarray(p, np.float64) for name, p in params.items()}
  states = {name: init_state(p, cfg) for name, p in params.items()}
  history = []
  for call in range(steps):
    grads = grad_fn(params, call)
    for name in params:
      params[name], states[name] = step(params[name], grads[name], states[name], cfg)
    history.append({name: p.copy() for name, p in params.items()})
  return history
