"""Helpers that run a library optimizer next to a float64 reference transcription, step for step.

``library_meta_twin`` maps a :class:`reference_meta_shampoo.MetaConfig` to the
``distributed_shampoo4(state_format="fp32", ...)`` call with the same semantics
(its defaults for Meta's), or raises ``NotImplementedError`` listing the
reference semantics the library has no option for; ``library_soap_twin`` does the same for
:class:`reference_soap.SoapConfig` and
``soap4(state_format="fp32", statistic="dense")``. ``max_relative_deviation``
runs both on the same minibatches and returns, per call, the largest parameter
deviation relative to the reference's displacement from the initial point;
``regression_batches`` are the minibatches those comparisons train on.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import reference_meta_shampoo as meta
import reference_soap as soap

import optax_shampoo4 as s4


def regression_batches(n_in: int, n_out: int, steps: int, batch: int = 32, seed: int = 0) -> dict:
  """``steps`` minibatches of a linear regression whose inputs span a decade of scales (an ill-conditioned Gram)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(steps, batch, n_in)) * np.logspace(0, -1, n_in)
  y = rng.normal(size=(steps, batch, n_out))
  return {"x": x, "y": y}


def missing_meta_semantics(cfg: meta.MetaConfig, shapes: list[tuple[int, ...]]) -> list[str]:
  """The parts of ``cfg`` that ``distributed_shampoo4`` cannot express today."""
  missing = []
  for shape in shapes:
    squeezed = tuple(n for n in shape if n != 1)
    merged = meta.merge_small_dims(shape, cfg.max_preconditioner_dim, cfg.target_dimensionality)
    if merged != squeezed:
      missing.append(f"merge_small_dims: Meta reshapes {shape} to {merged}; the library does not merge dimensions")
    elif len(merged) > 2:
      missing.append(f"one factor per dimension of {shape}: the library preconditions a 2-D view")
  if cfg.grafting is None:
    missing.append("no grafting: the library always grafts (frobenius / sgd / adagrad / rmsprop / adam)")
  return missing


def library_meta_twin(cfg: meta.MetaConfig, shapes: list[tuple[int, ...]]) -> optax.GradientTransformation:
  """``distributed_shampoo4(state_format="fp32")`` with ``cfg``'s semantics.

  The schedule (statistics every step, roots every ``precondition_frequency``
  from ``start``) is always passed; every other argument only where ``cfg``
  differs from Meta's defaults with Adam grafting (``MetaConfig(grafting=
  ("adam", 0.999, 1e-8))``), so the defaults of ``distributed_shampoo4`` are
  what a default ``cfg`` tests.
  """
  missing = missing_meta_semantics(cfg, shapes)
  if missing:
    raise NotImplementedError("; ".join(missing))
  _, g_beta2, g_eps = cfg.grafting
  defaults = meta.MetaConfig()
  given = {"b1": cfg.b1, "b2": g_beta2, "eps": g_eps, "weight_decay": cfg.weight_decay,
           "use_bias_correction": cfg.use_bias_correction, "beta": cfg.b2, "epsilon": cfg.epsilon,
           "max_order": int(cfg.max_preconditioner_dim)}
  meta_default = {"b1": defaults.b1, "b2": 0.999, "eps": 1e-8, "weight_decay": defaults.weight_decay,
                  "use_bias_correction": defaults.use_bias_correction, "beta": defaults.b2,
                  "epsilon": defaults.epsilon, "max_order": defaults.max_preconditioner_dim}
  changed = {name: value for name, value in given.items() if value != meta_default[name]}
  return s4.distributed_shampoo4(cfg.lr, state_format="fp32", stats_every=1, root_every=cfg.precondition_frequency,
                                 start_preconditioning_step=cfg.start, **changed)


def missing_soap_semantics(cfg: soap.SoapConfig) -> list[str]:
  """The reference SOAP semantics ``soap4(state_format="fp32", statistic="dense")`` cannot express."""
  missing = []
  if cfg.weight_decay > 0.0:
    missing.append("weight decay applied after the step, W <- (W - lr*c*N)(1 - lr*wd) (soap4: W - lr(c*N + wd*W))")
  if not cfg.correct_bias:
    missing.append("correct_bias=False: soap4 always applies Adam's bias correction")
  if cfg.precondition_1d:
    missing.append("precondition_1d=True: soap4 gives rank-1 leaves plain Adam")
  return missing


def library_soap_twin(cfg: soap.SoapConfig) -> optax.GradientTransformation:
  """``soap4(state_format="fp32", statistic="dense")`` with ``cfg``'s semantics.

  The dense statistic folded every step from zeros, the first basis by
  ``eigh``, one sorted QR step every ``precondition_frequency`` Adam steps
  with ``v`` only permuted (``project_nu`` False, the dense default) and
  ``m`` re-projected: the reference's algorithm. ``max_order`` is
  ``max_precond_dim`` so that no dimension is split into blocks (the
  reference does not block).
  """
  missing = missing_soap_semantics(cfg)
  if missing:
    raise NotImplementedError("; ".join(missing))
  return s4.soap4(cfg.lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=0.0,
                  shampoo_beta=cfg.statistic_beta, precondition_every=cfg.precondition_frequency,
                  max_order=cfg.max_precond_dim, max_precond_dim=cfg.max_precond_dim, state_format="fp32",
                  statistic="dense")


def max_relative_deviation(opt: optax.GradientTransformation, history: list[dict], params0: dict,
                           loss_fn, batches) -> np.ndarray:
  """Per call: ``max |W_lib - W_ref| / max |W_ref - W_0|`` over leaves, the library in float32.

  ``history`` is a reference run (params after each call) on ``batches[call]``;
  ``loss_fn(params, batch)`` is differentiated with ``jax.grad``.
  """
  params = {k: jnp.asarray(v, jnp.float32) for k, v in params0.items()}
  state = opt.init(params)

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  deviations = []
  for call, ref in enumerate(history):
    batch = {key: jnp.asarray(value[call], jnp.float32) for key, value in batches.items()}
    params, state = step(params, state, batch)
    dev = 0.0
    for name, value in params.items():
      moved = np.max(np.abs(ref[name] - params0[name]))
      diff = np.max(np.abs(np.asarray(value, np.float64) - ref[name]))
      dev = max(dev, diff / moved if moved > 0 else (0.0 if diff == 0 else math.inf))
    deviations.append(dev)
  return np.asarray(deviations)
