"""Tests of ``optax_shampoo4/optax_compat.py``: the placeholder ``optax.tree.map_params`` passes to ``init`` is
recognised (and nothing else is), and a Shampoo state's factor buckets come through ``map_params`` untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_shampoo4 as s4
from optax_shampoo4 import optax_compat


def test_recognises_the_placeholder_map_params_passes_to_init():
  seen = []

  def init(params):
    seen.append(optax_compat.is_params_placeholder(params))
    return optax.EmptyState()

  tx = optax.GradientTransformation(init, lambda u, s, p=None: (u, s))
  optax.tree.map_params(tx, lambda x: x, optax.EmptyState())
  assert seen == [True]


@pytest.mark.parametrize("tree", [{"w": jnp.zeros(3)}, jnp.zeros(()), None, (), optax_compat.NON_PARAMS])
def test_real_trees_are_not_the_placeholder(tree):
  assert not optax_compat.is_params_placeholder(tree)


def test_non_params_is_an_opaque_leaf():
  assert jax.tree.leaves({"a": optax_compat.NON_PARAMS}) == [optax_compat.NON_PARAMS]
  assert repr(optax_compat.NON_PARAMS) == "NON_PARAMS"


def test_map_params_maps_parameter_shaped_state_and_leaves_factor_buckets_alone():
  params = {"w": jnp.ones((8, 6)), "b": jnp.ones((6,))}
  tx = s4.adamw_shampoo4(1e-3, min_quant_order=4)
  state = tx.init(params)
  mapped = optax.tree.map_params(tx, lambda x: x + 1.0, state)
  factor_leaves, other_changed = 0, 0
  for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(mapped)):
    if "factors" in jax.tree_util.keystr(path):
      factor_leaves += 1
      np.testing.assert_array_equal(new, old, err_msg=jax.tree_util.keystr(path))
    else:
      other_changed += not np.array_equal(new, old)
  assert factor_leaves > 0, "no factor bucket in the state"
  assert other_changed > 0, "no parameter-shaped part of the state was mapped"
