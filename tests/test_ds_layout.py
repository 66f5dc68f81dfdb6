"""``distributed_shampoo4``'s default quantized layout: an 8-bit basis and no stored root, in the bytes of the
paper's 4-bit basis plus 4-bit root, and closer to the exact root on an ill-conditioned statistic.

The reference is a float64 eigendecomposition of the summed Gram matrices (Meta's statistic, ``beta=1``),
with the alias' damping (absolute ε plus the ``quant_damping`` floor).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_shampoo4 as s4
from optax_shampoo4 import factors as fct
from optax_shampoo4 import options
from optax_shampoo4.reference_aliases import DS_QUANT_DAMPING, ds_state_layout

EPSILON = 1e-12  # the alias' absolute ε
ORDER = 32


def _state_bytes(opt, params) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(opt.init, params)))


def test_default_layout_stores_an_8bit_basis_and_no_root():
  assert ds_state_layout("eigen", None, None, None, None) == (False, 8, (1, 0))
  assert ds_state_layout("eigen", None, None, None, (2, 2)) == (False, 8, (2, 2))
  assert ds_state_layout("eigen", None, None, 4, None) == (True, 4, (1, 4))  # bits given: the paper's layout
  assert ds_state_layout("eigen", None, True, None, None) == (True, None, (1, 4))
  assert ds_state_layout("eigen", "newton", None, None, None) == (True, None, (1, 4))
  assert ds_state_layout("fp32", None, None, None, None) == (True, None, (1, 4))
  params = {"w": jnp.zeros((256, 256))}
  state = s4.distributed_shampoo4(1e-3).init(params)
  buckets = [b for b in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, fct.EigenFactors))
             if isinstance(b, fct.EigenFactors)]
  assert buckets and all(b.root is None and b.eigvecs.bits == 8 for b in buckets)
  # The same bytes as the 4-bit basis and the 4-bit root (fewer: the root's float32 diagonal is gone).
  paper = _state_bytes(s4.distributed_shampoo4(1e-3, store_root=True), params)
  assert _state_bytes(s4.distributed_shampoo4(1e-3), params) <= paper


def test_fp32_twin_keeps_its_roots():
  state = s4.distributed_shampoo4(1e-3, state_format="fp32").init({"w": jnp.zeros((8, 8))})
  buckets = [b for b in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, fct.MatrixFactors))
             if isinstance(b, fct.MatrixFactors)]
  assert buckets and all(b.root is not None for b in buckets)


def _ill_conditioned_grams(seed: int, steps: int = 40, cond: float = 1e8) -> list[np.ndarray]:
  """Gram matrices whose sum has eigenvalues log-uniform over ``cond`` (in a random basis)."""
  rng = np.random.default_rng(seed)
  basis, _ = np.linalg.qr(rng.standard_normal((ORDER, ORDER)))
  scale = np.sqrt(np.logspace(0, -np.log10(cond), ORDER))
  factors = [(basis * scale) @ rng.standard_normal((ORDER, ORDER)) / np.sqrt(ORDER) for _ in range(steps)]
  return [g @ g.T for g in factors]


def _root64(stat: np.ndarray) -> np.ndarray:
  lam, vecs = np.linalg.eigh(stat)
  lam = np.maximum(lam, 0.0) + EPSILON + DS_QUANT_DAMPING * lam.max()
  return (vecs * lam**-0.25) @ vecs.T


def _relative_error(root: np.ndarray, want: np.ndarray) -> float:
  """:math:`\\|W^{-1/2} \\hat P W^{-1/2} - I\\|_2`: the worst relative error of ``root`` over directions."""
  lam, vecs = np.linalg.eigh(want)
  half = (vecs * lam**-0.5) @ vecs.T
  return float(np.linalg.norm(half @ root @ half - np.eye(len(root)), 2))


def _applied_root(store_root, bits, bjorck_steps, grams) -> np.ndarray:
  """The root a quantized factor with this layout applies after folding ``grams`` in, as the alias does."""
  config = options.ShampooOptions.from_kwargs(
      bits=bits, store_root=store_root, bjorck_steps=bjorck_steps, beta=1.0, epsilon=EPSILON,
      epsilon_mode="absolute", quant_damping=DS_QUANT_DAMPING).factor_config()
  bucket = fct.init_bucket(config, ORDER, 1, True, jnp.float32(0.0))
  for gram in grams:
    bucket, _ = fct.update_stats(config, bucket, jnp.asarray(gram[None], jnp.float32), jnp.float32(1.0))
  if store_root:
    bucket, _ = fct.update_root(config, bucket, jnp.float32(EPSILON))
    return np.asarray(fct.root_matrices(bucket)[0], np.float64)
  return np.asarray(fct.root_from_eigenbasis(config, bucket, jnp.float32(EPSILON))[0], np.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_layout_root_is_closer_to_the_float64_root_than_the_4bit_one(seed):
  grams = _ill_conditioned_grams(seed)
  want = _root64(np.sum(grams, axis=0))
  default = _relative_error(_applied_root(*ds_state_layout("eigen", None, None, None, None), grams), want)
  paper = _relative_error(_applied_root(*ds_state_layout("eigen", None, True, None, None), grams), want)
  # Observed: about 0.55 against 0.87 (cond 1e8: the 4-bit eigenvectors' rounding, re-encoded at each of the
  # 40 folds, inflates the smallest eigenvalues by up to ~200x, the 8-bit ones by ~6x).
  assert default < 0.75 * paper, (default, paper)
