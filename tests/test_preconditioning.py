"""Tests of ``optax_shampoo4/preconditioning.py``'s block products against float64 numpy: Shampoo's
:math:`\\hat L G \\hat R` from formed roots and from the roots' factors :math:`W` (:math:`\\hat A = W W^\\top`)."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import haar, rel, sweep

from optax_shampoo4 import preconditioning, roots

# Relative Frobenius error of a chain of float32 products: about n·u·κ per product (u = 2^-24, n ≤ 64,
# κ ≤ 10^(6/4) for a root of a 1e6-conditioned statistic), 3e-4 for four products; observed ~1e-6.
PRODUCT_TOL = 3e-4


def _factor_and_root64(n, cond, rng):
  u = haar(n, rng)
  eigvals = rng.permutation(np.logspace(0, -np.log10(cond), n))
  factor = roots.inverse_root_factor_from_eig(jnp.asarray(u, jnp.float32), jnp.asarray(eigvals, jnp.float32),
                                              jnp.float32(0.0))
  u64 = np.asarray(u, np.float32).astype(np.float64)
  return factor, (u64 * np.asarray(eigvals, np.float32).astype(np.float64) ** -0.25) @ u64.T


@pytest.mark.parametrize("shape", [(48, 24), (24, 48)])
@sweep(11)
def test_factored_product_equals_float64_root_product(shape, seed):
  rng = np.random.default_rng(seed)
  left, left64 = _factor_and_root64(shape[0], 1e6, rng)
  right, right64 = _factor_and_root64(shape[1], 1e4, rng)
  g = rng.standard_normal(shape).astype(np.float32)
  out = preconditioning.factored_shampoo_product(left, jnp.asarray(g), right)
  assert out.shape == shape
  assert rel(out, left64 @ g.astype(np.float64) @ right64) < PRODUCT_TOL
  # The formed roots' product agrees with it.
  formed = preconditioning.shampoo_product(left @ left.T, jnp.asarray(g), right @ right.T)
  assert rel(formed, left64 @ g.astype(np.float64) @ right64) < PRODUCT_TOL


@sweep(12)
def test_factored_product_of_a_vector_applies_the_left_root_twice(seed):
  rng = np.random.default_rng(seed)
  left, left64 = _factor_and_root64(32, 1e4, rng)
  x = rng.standard_normal((32, 1)).astype(np.float32)
  out = preconditioning.factored_shampoo_product(left, jnp.asarray(x), None)
  assert rel(out, left64 @ left64 @ x.astype(np.float64)) < PRODUCT_TOL
