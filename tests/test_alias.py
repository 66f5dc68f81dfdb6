"""Tests for the aliases: the paper's base-optimizer recipes around Shampoo."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_shampoo4 as s4

# Preconditioning never starts (roots stay I), so Shampoo's output is the
# gradient times ||G|| / (||G|| + 1e-12) and the alias must equal its base optimizer.
_NEVER = dict(stats_every=10**6, root_every=10**6)


def _params():
  return {"w": jnp.linspace(-1.0, 1.0, 12 * 10).reshape(12, 10), "b": jnp.ones((10,))}


def _run(opt, steps=5):
  params = _params()
  state = opt.init(params)
  loss = lambda p: jnp.sum(jnp.tanh(p["w"]) ** 2) + jnp.sum((p["b"] - 0.5) ** 2)  # noqa: E731

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (s4.adamw_shampoo4(1e-2, weight_decay=0.1, **_NEVER), optax.adamw(1e-2, weight_decay=0.1)),
        (s4.adamw_shampoo4(optax.cosine_decay_schedule(1e-2, 10), b1=0.8, b2=0.99, eps=1e-6,
                           weight_decay=0.0, **_NEVER),
         optax.adamw(optax.cosine_decay_schedule(1e-2, 10), b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.0)),
        (s4.sgdm_shampoo4(0.1, momentum=0.9, weight_decay=5e-4, **_NEVER),
         optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))),
        (s4.sgdm_shampoo4(0.1, momentum=0.9, nesterov=True, **_NEVER),
         optax.sgd(0.1, momentum=0.9, nesterov=True)),
        (s4.adagrad_shampoo4(1e-2, initial_accumulator_value=0.1, eps=1e-7, **_NEVER),
         optax.adagrad(1e-2, initial_accumulator_value=0.1, eps=1e-7)),
    ],
)
def test_alias_without_preconditioning_equals_base_optimizer(ours, theirs):
  ours_params, _ = _run(ours)
  theirs_params, _ = _run(theirs)
  chex.assert_trees_all_close(ours_params, theirs_params, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_adamw_mask_limits_weight_decay():
  mask = {"w": False, "b": True}
  opt = s4.adamw_shampoo4(0.0, weight_decay=0.5, mask=mask, **_NEVER)  # lr 0: nothing moves
  params, _ = _run(opt, steps=2)
  chex.assert_trees_all_close(params, _params())
  opt = s4.adamw_shampoo4(1e-2, weight_decay=10.0, mask=mask, **_NEVER)
  decayed, _ = _run(opt, steps=3)
  undecayed, _ = _run(s4.adamw_shampoo4(1e-2, weight_decay=0.0, **_NEVER), steps=3)
  chex.assert_trees_all_close(decayed["w"], undecayed["w"])
  assert not np.allclose(decayed["b"], undecayed["b"])


def test_alias_forwards_shampoo_arguments():
  opt = s4.adamw_shampoo4(1e-3, bits=8, quant_block=4, min_quant_order=12, stats_every=1, root_every=1)
  params, state = _run(opt, steps=2)
  shampoo_state = state[0]
  assert isinstance(shampoo_state, s4.ScaleByShampoo4State)
  eigvecs = shampoo_state.factors["order12_q"].eigvecs
  assert eigvecs.bits == 8 and eigvecs.codes.shape == (1, 12, 12) and eigvecs.scales.shape == (1, 12, 3)
  assert shampoo_state.factors["order10_f32"].eigvecs.dtype == jnp.float32
  chex.assert_tree_all_finite(params)


def test_alias_rejects_bad_shampoo_argument():
  with pytest.raises(ValueError, match="bits"):
    s4.sgdm_shampoo4(0.1, bits=2)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: s4.adamw_shampoo4(-1.0), "learning_rate"),
        (lambda: s4.adamw_shampoo4(1e-3, b1=1.0), "b1"),
        (lambda: s4.adamw_shampoo4(1e-3, b2=-0.5), "b2"),
        (lambda: s4.adamw_shampoo4(1e-3, eps=float("nan")), "eps"),
        (lambda: s4.adamw_shampoo4(1e-3, weight_decay=-1e-2), "weight_decay"),
        (lambda: s4.sgdm_shampoo4(0.1, momentum=1.5), "momentum"),
        (lambda: s4.sgdm_shampoo4(float("inf")), "learning_rate"),
        (lambda: s4.adagrad_shampoo4(1e-2, initial_accumulator_value=-1.0), "initial_accumulator_value"),
    ],
)
def test_alias_validates_its_own_arguments(make, name):
  with pytest.raises(ValueError, match=name):
    make()


def test_alias_type_errors_name_the_argument():
  with pytest.raises(TypeError, match="learning_rate"):
    s4.adamw_shampoo4("fast")
  with pytest.raises(TypeError, match="nesterov"):
    s4.sgdm_shampoo4(0.1, nesterov="yes")


def test_alias_module_keeps_the_reference_aliases_importable():
  """``optax_shampoo4.alias`` still names every alias, those moved to ``reference_aliases`` included."""
  from optax_shampoo4 import alias, reference_aliases

  for name in ("adamw_shampoo4", "sgdm_shampoo4", "adagrad_shampoo4", "distributed_shampoo4", "soap4"):
    assert getattr(alias, name) is getattr(s4, name), name
  assert s4.soap4 is reference_aliases.soap4 and s4.distributed_shampoo4 is reference_aliases.distributed_shampoo4
  assert sorted(alias.__all__) == sorted(["adamw_shampoo4", "sgdm_shampoo4", "adagrad_shampoo4",
                                          "distributed_shampoo4", "soap4"])
