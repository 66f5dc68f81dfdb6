"""SOAP's Adam moments (:func:`~optax_shampoo4.scale_by_soap4`): their initial state, and their storage (float32,
or 8-/4-bit codes) moved to and from the layout the step works in (each preconditioned leaf's matrix view)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optax_shampoo4 import engine, moment_storage, optax_compat, options, partition, sharding


def init_moments(opts: options.SoapOptions, params: Any) -> tuple[Any, Any, Any, Any]:
  """``(mu, mu_scales, nu, nu_scales)`` of a fresh state (scales None for float32 moments).

  Under ``optax.tree.map_params`` the moments are parameter-shaped (the
  placeholder itself), their scales are not.
  """
  if optax_compat.is_params_placeholder(params):
    scales = None if opts.moment_bits is None else optax_compat.NON_PARAMS
    return params, scales, params, scales
  if opts.moment_bits is None:
    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    return zeros, None, zeros, None
  mu, mu_scales = moment_storage.init_moment_trees(params, opts.moment_bits, "first")
  nu, nu_scales = moment_storage.init_moment_trees(params, opts.moment_bits, "second")
  return mu, mu_scales, nu, nu_scales


def load_moments(opts: options.SoapOptions, step: engine.Step, stored: Any, scales: Any, kind: str) -> list:
  """Per leaf, the float32 moment in the layout the step works in (matrix views where preconditioned)."""
  scales = [None] * len(step.leaves) if scales is None else step.treedef.flatten_up_to(scales)
  moments = []
  for x, sc, lp in zip(step.treedef.flatten_up_to(stored), scales, step.plan.leaves):
    if opts.moment_bits is not None:
      x = moment_storage.load_moment(moment_storage.join_stored(x, sc, lp.shape, opts.moment_bits, kind))
    moments.append(in_view(x, lp))
  return moments


def store_moments(opts: options.SoapOptions, step: engine.Step, stepped: jax.Array, moments: list,
                  codes: Any, scales: Any, kind: str) -> tuple[Any, Any]:
  """(stored moments, their scales): float32, or re-quantized where this step changed them."""
  values = jax.tree.unflatten(step.treedef, [sharding.reshape(x, lp.shape, like=leaf)
                                            for x, lp, leaf in zip(moments, step.plan.leaves, step.leaves)])
  if opts.moment_bits is None:
    return values, None
  changed = jax.tree.map(lambda x: stepped & jnp.all(jnp.isfinite(x)), values)
  return moment_storage.store_moment_trees(values, codes, scales, changed, opts.moment_bits, kind,
                                           moment_storage.rounding_key(step.count, opts.moment_bits, kind))


def in_view(moment: jax.Array, leaf_plan: partition.LeafPlan) -> jax.Array:
  """A stored moment in the layout the step works in (the matrix view for preconditioned leaves)."""
  return sharding.reshape(moment, leaf_plan.view_shape) if leaf_plan.preconditioned else moment
