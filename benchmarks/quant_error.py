"""Quantization errors of A^(-1/4), measured with our code (paper Tables 1, 5, 6, 7 and Fig. 3).

Run:  python benchmarks/quant_error.py [--real PATH.npy] [--order 1200]
                                      [--out benchmarks/results/quant_error.json]
                                      [--png benchmarks/results/bjorck.png]

For two matrices, every codebook (DT = ``"dynamic_tree"``, Linear-2 =
``"linear2"``), every (bits, block) in {(3, 64), (4, 64), (8, 64), (8, 256)} and every
quantization mode (QM) of the paper (App. D) it computes

  NRE = ||f(A) - f~(A)||_F / ||f(A)||_F,  AE = arccos(<f(A), f~(A)> / (||f(A)|| ||f~(A)||)) in degrees,

for f(A) = (A + eps lambda_max I)^(-1/4) (eps = 1e-6, reference in float64 from
the exact eigendecomposition) and for its off-diagonal part
f(A) - Diag(diag f(A)) (Table 6). The quantizer is always ours
(``quantization.quantize`` / ``quantize_offdiag``, codes and scales), and so
are Björck and both root methods:

  A          naive PIRU: A stored as fp32 diag + quantized off-diagonal
             (``FactorConfig.store``), root by our coupled Newton
             (``roots.inverse_root_newton``, as ``factors.update_root`` does on a
             naive bucket), root kept in fp32
  U          App. D's definition, f(g(A)) with g(A) = V Lambda V^T, V = D(Q(U)):
             the quantized eigenvectors, then the exact float64 matrix function
  U+OR       ``factors.update_root`` on an eigen bucket (quantized rows of the
             exact U, fp32 exact eigenvalues): V = Björck^4(D(Q(U))),
             root V (lambda + eps max lambda)^(-1/4) V^T (Alg. 2), root in fp32
  B          ``factors.update_root`` with fp32 exact U: only the root is
             quantized (fp32 diag + quantized off-diagonal)
  (A,B)      the naive 4-bit pipeline (A, then the root quantized)
  (U,B)      App. D: the U root above, then quantized (g2 o f o g1)
  (U,B)+OR   ``factors.update_root``: the full 4-bit Shampoo PIRU (Alg. 2, t2 = 4)

plus two extra rows, what Alg. 2 itself computes without Björck
(``update_root`` with t2 = 0: V f(Lambda) V^T with a non-orthogonal V), and two
unquantized floors (fp32 Newton, fp32 eigenpairs).

Why two "U" rows: without OR the paper's U / (U,B) numbers are matched only by
App. D's definition (exact f of V Lambda V^T); Alg. 2 with t2 = 0 is about 3x
worse (0.15 vs 0.05 NRE at 4-bit Linear-2), because V f(Lambda) V^T inherits
V's non-orthogonality at first order while the exact f of V Lambda V^T damps
it by the root's exponent. With OR both coincide (V is orthogonal).

The matrices:

* ``real``: a real 32-bit Shampoo statistic. ``--real PATH`` loads a square
  ``.npy``. The committed ``results/quant_error.json`` used the order-512
  statistic saved by ``python examples/transformer_lm.py --optimizers
  adamw+shampoo32 --epsilon 1e-6 --steps 600 --save-preconditioner PATH``
  (cond 1.6e3, a smoothly decaying spectrum). Without ``--real`` one is
  captured here by training a 64-512-512-10 MLP on scikit-learn's digits with
  ``s4.adamw_shampoo4(state_format="fp32")`` and taking the left factor L
  (order 512) of the 512x512 hidden weight (cond 8.7e4, but about half of its
  eigenvalues sit at the decayed initial eps I);
  ``results/quant_error_digits_mlp.json``. The paper's A1 is an order-1200
  Swin-T statistic with cond 37235.
* ``A2``: synthetic U diag(lambda) U^T of order ``--order`` (1200 as in the
  paper) with a Haar-random U (seed 0) and two eigenvalue levels, 1 and 1e-4,
  half of the eigenvalues at each (``--a2-high-fraction``, ``--a2-ratio``).
  The paper does not give them. Of the candidates we tried (fraction 0.1 or
  0.5, ratio 1e3, 1e4, 1e5) this one is closest to the paper's A2 errors for
  U, U+OR and B (Linear-2: 0.101 / 0.068 / 0.068 vs the paper's 0.094 /
  0.067 / 0.066); with 10% at the high level U+OR and B come out 2x lower
  (0.031). The A rows match none of the candidates (see the report).

Fig. 3 (Björck): mean |(V Lambda^s V^T)^(-1/s) (V Lambda V^T) - I| over the
entries, for t2 = 0..5 and s in {-1, -1/4, -1/10, -1/20}, V =
Björck^t2(D(Q(U))) on the real matrix (as the paper, on A1; ``--fig3-a2`` adds
A2), 4-bit, block 64; ``linalg.bjorck`` runs in float32, the rest in float64;
-1/s is an integer, so the power is exact matrix multiplication. Lambda is the
damped spectrum lambda + eps max lambda (the raw lambda^s of a nearly singular
statistic would overflow).

A last table puts 3, 4 and 8 bits side by side (block 64, Tables 1/5's f =
A^(-1/4); the paper has no 3-bit numbers): how much of the quantized
eigenvector format's advantage survives one bit less.

Prints our numbers beside the paper's, checks the paper's orderings, writes
JSON and the Björck plot. About 1.5-3 min on two (shared) CPU cores with
``--real``, plus 1-1.5 min to capture the real statistic without it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import optax_shampoo4 as s4  # noqa: E402
from optax_shampoo4 import factors as fct  # noqa: E402
from optax_shampoo4 import (
  linalg,  # noqa: E402
  roots,  # noqa: E402
)
from optax_shampoo4 import quantization as qz  # noqa: E402

EPSILON = 1e-6
MAPPINGS = {"DT": "dynamic_tree", "Linear-2": "linear2"}
SETTINGS = ((3, 64), (4, 64), (8, 64), (8, 256))  # (bits, block)
BITS_TABLE = (3, 4, 8)  # bit widths side by side at block 64
MODES = ("A", "U", "U+OR", "B", "(A,B)", "(U,B)", "(U,B)+OR")  # the paper's rows
EXTRA_MODES = ("U, Alg.2 t2=0", "(U,B), Alg.2 t2=0")  # what Alg. 2 does without Björck
FLOORS = ("fp32 Newton", "fp32 eigen")
BJORCK_T2 = 4  # the paper's t2 ("OR" = orthogonal rectification)
FIG3_STEPS = tuple(range(6))
FIG3_POWERS = (1, 4, 10, 20)  # -1/s for s = -1, -1/4, -1/10, -1/20

# Paper values (verbatim from the paper, §3.1-3.4).
# Tables 5 and 6 (4-bit, block 64): (A1 NRE, A1 AE, A2 NRE, A2 AE).
PAPER_T5 = {
    "DT": {"A": (0.6241, 17.319, 0.4615, 17.189), "U": (0.0709, 4.0426, 0.1224, 7.0144),
           "U+OR": (0.0455, 2.5615, 0.0878, 4.9960), "B": (0.0398, 2.2802, 0.0853, 4.8914),
           "(A,B)": (0.6243, 17.364, 0.4649, 17.650), "(U,B)": (0.0811, 4.6296, 0.1485, 8.5168),
           "(U,B)+OR": (0.0604, 3.4230, 0.1224, 6.9817)},
    "Linear-2": {"A": (0.6243, 17.293, 0.4465, 15.338), "U": (0.0543, 3.1066, 0.0942, 5.3998),
                 "U+OR": (0.0343, 1.9456, 0.0669, 3.8166), "B": (0.0315, 1.8050, 0.0661, 3.7887),
                 "(A,B)": (0.6243, 17.301, 0.4483, 15.654), "(U,B)": (0.0626, 3.5833, 0.1150, 6.5901),
                 "(U,B)+OR": (0.0466, 2.6494, 0.0941, 5.3716)},
}
PAPER_T6 = {
    "DT": {"A": (0.9549, 59.360, 0.6247, 25.913), "U": (0.2328, 13.287, 0.1994, 11.444),
           "U+OR": (0.1480, 8.4365, 0.1427, 8.1415), "B": (0.1314, 7.5513, 0.1391, 7.9813),
           "(A,B)": (0.9561, 59.825, 0.6314, 26.948), "(U,B)": (0.2666, 15.281, 0.2420, 13.911),
           "(U,B)+OR": (0.1977, 11.322, 0.1992, 11.393)},
    "Linear-2": {"A": (0.9547, 58.336, 0.6010, 20.780), "U": (0.1786, 10.213, 0.1534, 8.8027),
                 "U+OR": (0.1122, 6.4096, 0.1088, 6.2176), "B": (0.1041, 5.9554, 0.1078, 6.1755),
                 "(A,B)": (0.9548, 58.601, 0.6047, 21.666), "(U,B)": (0.2063, 11.778, 0.1873, 10.745),
                 "(U,B)+OR": (0.1530, 8.7337, 0.1532, 8.7534)},
}
# Table 7 (8-bit, block 256, A1): (NRE f, AE f, NRE offdiag f, AE offdiag f).
PAPER_T7 = {
    "DT": {"A": (0.2192, 8.3014, 0.5001, 23.644), "U": (0.0060, 0.3421, 0.0197, 1.1273),
           "U+OR": (0.0037, 0.2140, 0.0123, 0.7022), "B": (0.0029, 0.1655, 0.0097, 0.5553),
           "(A,B)": (0.2193, 8.3051, 0.5003, 23.649), "(U,B)": (0.0067, 0.3810, 0.0219, 1.2577),
           "(U,B)+OR": (0.0047, 0.2712, 0.0156, 0.8955)},
    "Linear-2": {"A": (0.2164, 7.9751, 0.4875, 21.447), "U": (0.0037, 0.2121, 0.0122, 0.6994),
                 "U+OR": (0.0023, 0.1312, 0.0076, 0.4343), "B": (0.0021, 0.1203, 0.0070, 0.4035),
                 "(A,B)": (0.2164, 7.9755, 0.4875, 21.448), "(U,B)": (0.0043, 0.2439, 0.0141, 0.8079),
                 "(U,B)+OR": (0.0031, 0.1791, 0.0104, 0.5935)},
}
# Table 1's 8-bit rows (QM = A, caption: block 64): (A1 NRE, A1 AE, A2 NRE, A2 AE).
PAPER_T1_8BIT = {"DT": (0.2192, 8.3014, 0.1896, 10.877), "Linear-2": (0.2164, 7.9751, 0.1310, 7.4717)}


# ----------------------------------------------------------------------------- matrices


def synthetic_a2(n: int, seed: int = 0, high_fraction: float = 0.1, ratio: float = 1e4):
  """U diag(lambda) U^T with Haar U; lambda = 1 (first 10%) and 1/ratio (rest)."""
  rng = np.random.default_rng(seed)
  q, r = np.linalg.qr(rng.standard_normal((n, n)))
  u = q * np.sign(np.diag(r))  # Haar measure
  lam = np.where(np.arange(n) < int(round(high_fraction * n)), 1.0, 1.0 / ratio)
  return (u * lam) @ u.T, u, lam


def capture_real_statistic(steps: int = 600, hidden: int = 512, seed: int = 0) -> np.ndarray:
  """The left statistic L of the hidden x hidden weight of an MLP on digits.

  Trains 64-hidden-hidden-10 (ReLU, batch 128) with
  ``s4.adamw_shampoo4(1e-3, state_format="fp32", stats_every=10, root_every=50)``
  for ``steps`` steps and returns that factor's float32 statistic.
  """
  import optax
  from sklearn.datasets import load_digits

  digits = load_digits()
  x = np.asarray(digits.data / 16.0, np.float32)
  x = (x - x.mean(0)) / (x.std(0) + 1e-3)
  y = np.asarray(digits.target)
  key = jax.random.key(seed)
  k1, k2, k3 = jax.random.split(key, 3)
  he = jax.nn.initializers.he_normal()
  params = {"w1": he(k1, (64, hidden)), "b1": jnp.zeros(hidden),
            "w2": he(k2, (hidden, hidden)), "b2": jnp.zeros(hidden),
            "w3": he(k3, (hidden, 10)), "b3": jnp.zeros(10)}

  def loss_fn(p, xb, yb):
    h = jax.nn.relu(xb @ p["w1"] + p["b1"])
    h = jax.nn.relu(h @ p["w2"] + p["b2"])
    logits = h @ p["w3"] + p["b3"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  opt = s4.adamw_shampoo4(1e-3, state_format="fp32", stats_every=10, root_every=50)
  state = opt.init(params)

  @jax.jit
  def step(p, s, xb, yb):
    loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(x), 128)
    params, state, loss = step(params, state, x[idx], y[idx])
  # Locate the left factor of w2 in the plan (leaves in jax.tree.leaves order).
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  names = [jax.tree_util.keystr(path) for path, _ in leaves]
  plan = s4.partition.make_plan([leaf.shape for _, leaf in leaves], 1024, 64, False)
  slot = plan.leaves[names.index("['w2']")].blocks[0].left
  shampoo_state = state[0]
  stat = shampoo_state.factors[slot.bucket.name].stats[slot.index]
  print(f"  captured L of w2 ({hidden}x{hidden}) after {steps} steps, final loss {float(loss):.3f}")
  return np.asarray(stat, np.float32)


def load_real(path: str) -> np.ndarray:
  a = np.load(path)
  while a.ndim > 2:
    a = a[0]
  if a.ndim != 2 or a.shape[0] != a.shape[1]:
    raise ValueError(f"{path}: expected a square matrix, got shape {a.shape}")
  return a


def eig_f64(a: np.ndarray):
  a = np.asarray(a, np.float64)
  a = (a + a.T) / 2.0
  lam, u = np.linalg.eigh(a)
  return a, u, lam


def reference_root(u: np.ndarray, lam: np.ndarray, epsilon: float = EPSILON) -> np.ndarray:
  """(A + eps lambda_max I)^(-1/4) in float64 from the exact eigenpairs (negatives -> 0)."""
  lam = np.maximum(lam, 0.0)
  return (u * (lam + epsilon * lam.max()) ** -0.25) @ u.T


# ----------------------------------------------------------------------------- roots via our code


def _f64(x) -> np.ndarray:
  return np.asarray(x, np.float64)


def eigen_root(u, lam, mapping, bits, block, quant_u, quant_root, t2):
  """PIRU (``fct.update_root``) of a one-factor eigen bucket holding (U, lambda).

  U is stored as rows, quantized or fp32; the root is stored quantized (fp32
  diag + quantized off-diagonal) or fp32. Run eagerly: jitting every
  (mapping, bits, block, t2) would recompile ~30 times per matrix.
  """
  n = u.shape[0]
  config = fct.FactorConfig(state_format="eigen", bits=bits, mapping=mapping, quant_block=block,
                            bjorck_steps=(1, t2), root_method="eigen")
  eigvecs = config.store(jnp.asarray(u.T[None], jnp.float32), quant_u, separate_diag=False)
  root0 = config.store(jnp.eye(n, dtype=jnp.float32)[None], quant_root, separate_diag=True)
  bucket = fct.EigenFactors(eigvecs, jnp.asarray(lam[None], jnp.float32), root0)
  new, accepted = fct.update_root(config, bucket, EPSILON)
  return _f64(fct.root_matrices(new)[0]), bool(accepted.all())


_newton = jax.jit(roots.inverse_root_newton)


def newton_root(a, mapping, bits, block, quant_a, quant_root):
  """The naive PIRU: coupled Newton on the stored A (fp32 diag + quantized off-diagonal).

  The same steps as ``fct.update_root`` on a naive bucket (``fct.load`` of the
  stored statistic, ``roots.inverse_root_newton``, ``FactorConfig.store`` of
  the root), with Newton jitted once per shape instead of once per codebook.
  """
  config = fct.FactorConfig(state_format="naive", bits=bits, mapping=mapping, quant_block=block,
                            root_method="newton")
  stats = config.store(jnp.asarray(a[None], jnp.float32), quant_a, separate_diag=True)
  root = _newton(fct.load(stats), jnp.float32(EPSILON))
  accepted = bool(jnp.all(jnp.isfinite(root)))
  return _f64(fct.load(config.store(root, quant_root, separate_diag=True))[0]), accepted


def exact_root(m: np.ndarray) -> np.ndarray:
  """(M + eps lambda_max I)^(-1/4) of a symmetrized float64 M (negative eigenvalues -> 0)."""
  m = (m + m.T) / 2.0
  lam, u = np.linalg.eigh(m)
  return reference_root(u, lam)


def appendix_d_u_root(u, lam, mapping, bits, block):
  """Paper App. D's QM = U without OR: exact f of g(A) = V Lambda V^T, V = D(Q(U)).

  Our quantizer, then the float64 matrix function (not Alg. 2's
  V f(Lambda) V^T, which differs when V is not orthogonal).
  """
  rows = qz.dequantize(qz.quantize(jnp.asarray(u.T, jnp.float32), mapping, bits, block))
  v = _f64(rows).T
  root = exact_root((v * np.maximum(lam, 0.0)) @ v.T)
  return root, bool(np.all(np.isfinite(root)))


def errors(approx: np.ndarray, exact: np.ndarray) -> dict:
  def nre_ae(x, y):
    nre = np.linalg.norm(x - y) / np.linalg.norm(y)
    cos = np.sum(x * y) / (np.linalg.norm(x) * np.linalg.norm(y))
    return float(nre), float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))

  off = lambda m: m - np.diag(np.diag(m))  # noqa: E731
  nre, ae = nre_ae(approx, exact)
  nre_off, ae_off = nre_ae(off(approx), off(exact))
  return {"nre": nre, "ae": ae, "nre_offdiag": nre_off, "ae_offdiag": ae_off}


def _mode_root(mode, a32, u, lam, q, u_root):
  """The approximate root of one quantization mode; ``q = (mapping, bits, block)``."""
  if mode == "A":
    return newton_root(a32, *q, True, False)
  if mode == "(A,B)":
    return newton_root(a32, *q, True, True)
  if mode == "U":
    return u_root
  if mode == "(U,B)":
    root = qz.dequantize_offdiag(qz.quantize_offdiag(jnp.asarray(u_root[0], jnp.float32), *q))
    return _f64(root), u_root[1]
  quant_u, quant_root, t2 = {
      "U+OR": (True, False, BJORCK_T2),
      "B": (False, True, 0),
      "(U,B)+OR": (True, True, BJORCK_T2),
      "U, Alg.2 t2=0": (True, False, 0),
      "(U,B), Alg.2 t2=0": (True, True, 0),
  }[mode]
  return eigen_root(u, lam, *q, quant_u, quant_root, t2)


def measure_matrix(a, u, lam) -> dict:
  """All modes x mappings x settings for one matrix, plus the unquantized floors."""
  exact = reference_root(u, lam)
  a32 = np.asarray(a, np.float32)
  out = {"floors": {}, "modes": {}}
  root, ok = newton_root(a32, "linear2", 4, 64, False, False)
  out["floors"]["fp32 Newton"] = {**errors(root, exact), "accepted": ok}
  root, ok = eigen_root(u, lam, "linear2", 4, 64, False, False, 0)
  out["floors"]["fp32 eigen"] = {**errors(root, exact), "accepted": ok}
  for label, mapping in MAPPINGS.items():
    for bits, block in SETTINGS:
      q = (mapping, bits, block)
      u_root = appendix_d_u_root(u, lam, *q)
      rows = {}
      for mode in MODES + EXTRA_MODES:
        root, ok = _mode_root(mode, a32, u, lam, q, u_root)
        rows[mode] = {**errors(root, exact), "accepted": ok}
      out["modes"][f"{label}/{bits}bit/block{block}"] = rows
  return out


# ----------------------------------------------------------------------------- Fig. 3


def bjorck_curves(u, lam, mapping: str = "linear2", bits: int = 4, block: int = 64) -> dict:
  """Fig. 3: mean |(V L^s V^T)^(-1/s) (V L V^T) - I| for t2 = 0..5, s = -1/k."""
  lam = np.maximum(lam, 0.0)
  lam = lam + EPSILON * lam.max()
  rows = qz.dequantize(qz.quantize(jnp.asarray(u.T, jnp.float32), mapping, bits, block))
  n = u.shape[0]
  eye = np.eye(n)
  curves = {f"-1/{k}" if k > 1 else "-1": [] for k in FIG3_POWERS}
  for t2 in FIG3_STEPS:
    v = np.asarray(linalg.bjorck(rows, t2), np.float64).T  # columns = eigenvectors
    a_v = (v * lam) @ v.T
    for k in FIG3_POWERS:
      m = (v * lam ** (-1.0 / k)) @ v.T
      power = np.linalg.matrix_power(m, k)
      curves[f"-1/{k}" if k > 1 else "-1"].append(float(np.mean(np.abs(power @ a_v - eye))))
  return curves


def plot_bjorck(fig3: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(fig3), figsize=(5.2 * len(fig3), 4.0), squeeze=False)
  for ax, (matrix, by_mapping) in zip(axes[0], fig3.items()):
    for mapping, style in (("Linear-2", "-"), ("DT", "--")):
      if mapping not in by_mapping:
        continue
      for color, (s, values) in zip(("C0", "C1", "C2", "C3"), by_mapping[mapping].items()):
        ax.semilogy(FIG3_STEPS, values, style, marker="o", ms=3, color=color,
                    label=f"{mapping}, s={s}")
    ax.set_xlabel("Björck steps t2")
    ax.set_ylabel("mean |(VΛˢVᵀ)^(-1/s)(VΛVᵀ) − I|")
    ax.set_title(f"{matrix}: V = Björck^t2(D(Q(U))), 4-bit, block 64", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------------- printing


def _fmt(v, ae=False):
  return f"{v:7.3f}" if ae else f"{v:7.4f}"


def print_two_matrix_table(title, results, key_nre, key_ae, paper, real_name, setting="4bit/block64"):
  print(f"\n{title}")
  print(f"{'':10s}{'':18s}| {real_name + ' (ours)':>17s} {'A1 (paper)':>17s} | "
        f"{'A2 (ours)':>17s} {'A2 (paper)':>17s}")
  print(f"{'R':10s}{'QM':18s}| " + " ".join(f"{'NRE':>7s} {'AE°':>8s} " for _ in range(2)) + "| "
        + " ".join(f"{'NRE':>7s} {'AE°':>8s} " for _ in range(2)))
  for label in MAPPINGS:
    for mode in MODES:
      r1 = results["real"]["modes"][f"{label}/{setting}"][mode]
      r2 = results["A2"]["modes"][f"{label}/{setting}"][mode]
      p = paper[label][mode]
      print(f"{label:10s}{mode:18s}| {_fmt(r1[key_nre])} {_fmt(r1[key_ae], True)}  "
            f"{_fmt(p[0])} {_fmt(p[1], True)}  | {_fmt(r2[key_nre])} {_fmt(r2[key_ae], True)}  "
            f"{_fmt(p[2])} {_fmt(p[3], True)}")
    for mode in EXTRA_MODES:
      r1 = results["real"]["modes"][f"{label}/{setting}"][mode]
      r2 = results["A2"]["modes"][f"{label}/{setting}"][mode]
      print(f"{label:10s}{mode:18s}| {_fmt(r1[key_nre])} {_fmt(r1[key_ae], True)}  {'':17s}| "
            f"{_fmt(r2[key_nre])} {_fmt(r2[key_ae], True)}")
  for floor in FLOORS:
    r1, r2 = results["real"]["floors"][floor], results["A2"]["floors"][floor]
    print(f"{'(none)':10s}{floor:18s}| {_fmt(r1[key_nre])} {_fmt(r1[key_ae], True)}  {'':17s}| "
          f"{_fmt(r2[key_nre])} {_fmt(r2[key_ae], True)}")


def print_table7(results, real_name):
  print("\nTable 7 — 8-bit, block 256: f = A^(-1/4) and its off-diagonal part "
        f"(ours on {real_name} / paper on A1; ours on A2 at the right)")
  print(f"{'R':10s}{'QM':18s}| {'NRE f':>7s} {'AE°':>8s} {'NRE off':>8s} {'AE° off':>8s} | "
        f"{'paper':>7s} {'AE°':>8s} {'NRE off':>8s} {'AE° off':>8s} | {'A2 NRE':>7s} {'NRE off':>8s}")
  for label in MAPPINGS:
    for mode in MODES + EXTRA_MODES:
      r = results["real"]["modes"][f"{label}/8bit/block256"][mode]
      r2 = results["A2"]["modes"][f"{label}/8bit/block256"][mode]
      p = PAPER_T7[label].get(mode)
      paper = (f"{_fmt(p[0])} {_fmt(p[1], True)}  {_fmt(p[2])} {_fmt(p[3], True)}" if p
               else " " * 34)
      print(f"{label:10s}{mode:18s}| {_fmt(r['nre'])} {_fmt(r['ae'], True)}  {_fmt(r['nre_offdiag'])} "
            f"{_fmt(r['ae_offdiag'], True)} | {paper} | {_fmt(r2['nre'])}  {_fmt(r2['nre_offdiag'])}")


def print_table1_8bit(results, real_name):
  print("\nTable 1 — 8-bit rows (QM = A), f = A^(-1/4): ours at block 64 and 256 vs paper "
        "(caption: block 64; same numbers as Table 7's block-256 rows)")
  print(f"{'R':10s}{'matrix':8s}| {'blk 64':>15s} | {'blk 256':>15s} | {'paper':>15s}")
  for label in MAPPINGS:
    for matrix, name, off in (("real", real_name, 0), ("A2", "A2", 2)):
      r64 = results[matrix]["modes"][f"{label}/8bit/block64"]["A"]
      r256 = results[matrix]["modes"][f"{label}/8bit/block256"]["A"]
      p = PAPER_T1_8BIT[label]
      print(f"{label:10s}{name:8s}| {_fmt(r64['nre'])} {_fmt(r64['ae'], True)} | "
            f"{_fmt(r256['nre'])} {_fmt(r256['ae'], True)} | {_fmt(p[off])} {_fmt(p[off + 1], True)}")


def print_bits_table(results, real_name):
  """NRE (AE°) of f = A^(-1/4) at 3, 4 and 8 bits, block 64, for every mapping and mode."""
  print(f"\nTables 1/5 at {', '.join(map(str, BITS_TABLE))} bits — block 64, f(A) = A^(-1/4), "
        "NRE (AE°); the paper reports 4 and 8 bits only")
  cell = 17
  header = "".join(f"{f'{b}-bit':>{cell}s}" for b in BITS_TABLE)
  print(f"{'R':10s}{'QM':18s}| {real_name:^{cell * len(BITS_TABLE)}s} | {'A2':^{cell * len(BITS_TABLE)}s}")
  print(f"{'':10s}{'':18s}| {header} | {header}")
  for label in MAPPINGS:
    for mode in MODES + EXTRA_MODES:
      cells = []
      for matrix in ("real", "A2"):
        row = ""
        for bits in BITS_TABLE:
          r = results[matrix]["modes"][f"{label}/{bits}bit/block64"][mode]
          row += f"{r['nre']:8.4f} ({r['ae']:6.2f})".rjust(cell)
        cells.append(row)
      print(f"{label:10s}{mode:18s}| {cells[0]} | {cells[1]}")


def check_orderings(results) -> list[dict]:
  """The paper's qualitative claims, on NRE (f and off-diagonal f), per matrix/mapping/setting."""
  checks = []

  def add(claim, where, lhs, rhs, left, right):
    checks.append({"claim": claim, "where": where, "lhs": lhs, "rhs": rhs,
                   "holds": bool(left < right), "values": [left, right]})

  for matrix, res in results.items():
    for setting, rows in res["modes"].items():
      where = f"{matrix} {setting}"
      for key in ("nre", "nre_offdiag"):
        tag = "" if key == "nre" else " (off-diag)"
        add("U < A" + tag, where, "U", "A", rows["U"][key], rows["A"][key])
        add("(U,B) < (A,B)" + tag, where, "(U,B)", "(A,B)", rows["(U,B)"][key], rows["(A,B)"][key])
        add("OR helps: U+OR < U" + tag, where, "U+OR", "U", rows["U+OR"][key], rows["U"][key])
        add("OR helps: (U,B)+OR < (U,B)" + tag, where, "(U,B)+OR", "(U,B)",
            rows["(U,B)+OR"][key], rows["(U,B)"][key])
        add("OR helps: U+OR < U, Alg.2 t2=0" + tag, where, "U+OR", "U, Alg.2 t2=0",
            rows["U+OR"][key], rows["U, Alg.2 t2=0"][key])
        add("B <= U+OR (paper tables)" + tag, where, "B", "U+OR", rows["B"][key], rows["U+OR"][key])
        add("U+OR < (U,B)+OR" + tag, where, "U+OR", "(U,B)+OR", rows["U+OR"][key],
            rows["(U,B)+OR"][key])
    for bits, block in SETTINGS:
      for mode in MODES + EXTRA_MODES:
        lin = res["modes"][f"Linear-2/{bits}bit/block{block}"][mode]["nre"]
        dt = res["modes"][f"DT/{bits}bit/block{block}"][mode]["nre"]
        add(f"Linear-2 <= DT ({mode})", f"{matrix} {bits}bit/block{block}", "Linear-2", "DT",
            lin, dt + 1e-12)
    for label in MAPPINGS:
      for mode in MODES + EXTRA_MODES:
        add(f"8-bit < 4-bit ({mode})", f"{matrix} {label} block64", "8-bit", "4-bit",
            res["modes"][f"{label}/8bit/block64"][mode]["nre"],
            res["modes"][f"{label}/4bit/block64"][mode]["nre"])
        add(f"4-bit < 3-bit ({mode})", f"{matrix} {label} block64", "4-bit", "3-bit",
            res["modes"][f"{label}/4bit/block64"][mode]["nre"],
            res["modes"][f"{label}/3bit/block64"][mode]["nre"])
  return checks


def print_checks(checks):
  print("\nOrderings (paper's claims), NRE:")
  groups: dict = {}
  for c in checks:
    groups.setdefault(c["claim"], []).append(c)
  for claim, cs in groups.items():
    failed = [c for c in cs if not c["holds"]]
    status = "holds" if not failed else f"FAILS in {len(failed)}/{len(cs)}"
    print(f"  {claim:48s} {status}")
    for c in failed:
      print(f"      {c['where']}: {c['lhs']} {c['values'][0]:.4f} vs {c['rhs']} {c['values'][1]:.4f}")


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--real", default=None,
                      help="a square .npy Shampoo statistic; default: capture one (digits MLP)")
  parser.add_argument("--real-source", default=None, help="provenance of --real, for the JSON")
  parser.add_argument("--real-name", default=None, help="short label of the real matrix (default realN)")
  parser.add_argument("--save-real", default=None, help="save the captured statistic to this .npy")
  parser.add_argument("--order", type=int, default=1200, help="order of the synthetic A2")
  parser.add_argument("--a2-high-fraction", type=float, default=0.5,
                      help="fraction of A2's eigenvalues at the high level 1")
  parser.add_argument("--a2-ratio", type=float, default=1e4, help="A2's high / low eigenvalue")
  parser.add_argument("--capture-steps", type=int, default=600)
  parser.add_argument("--fig3-a2", action="store_true",
                      help="also draw Fig. 3 for A2 (about 40 s more at order 1200)")
  results_dir = pathlib.Path(__file__).parent / "results"
  parser.add_argument("--out", default=str(results_dir / "quant_error.json"))
  parser.add_argument("--png", default=str(results_dir / "bjorck.png"), help="'' to skip the plot")
  args = parser.parse_args(argv)
  t_start = time.time()
  timings = {}

  t = time.time()
  if args.real:
    real = load_real(args.real)
    real_source = f"--real {args.real}" + (f": {args.real_source}" if args.real_source else "")
  else:
    print("Capturing a real 32-bit Shampoo statistic (no --real given) ...")
    real = capture_real_statistic(args.capture_steps)
    real_source = (f"captured: left statistic L of the 512x512 hidden weight of a 64-512-512-10 MLP on "
                   f"scikit-learn digits after {args.capture_steps} steps of "
                   f"s4.adamw_shampoo4(1e-3, state_format='fp32', stats_every=10, root_every=50), seed 0")
    if args.save_real:
      np.save(args.save_real, real)
  timings["real_matrix_s"] = time.time() - t
  real_name = args.real_name or f"real{real.shape[0]}"
  a_real, u_real, lam_real = eig_f64(real)
  pos = lam_real[lam_real > 0]
  info = {"real": {"source": real_source, "order": int(real.shape[0]),
                   "cond": float(lam_real.max() / pos.min()) if pos.size else float("inf"),
                   "cond_damped": float((lam_real.max() * (1 + EPSILON)) / (max(lam_real.min(), 0.0)
                                                                             + EPSILON * lam_real.max())),
                   "n_nonpositive_eigvals": int(np.sum(lam_real <= 0))},
          "A2": {"source": f"synthetic: Haar U (seed 0) diag(lambda) U^T, order {args.order}, lambda = 1 "
                           f"for a fraction {args.a2_high_fraction} of the eigenvalues, "
                           f"{1 / args.a2_ratio:g} for the rest",
                 "order": args.order, "cond": args.a2_ratio, "high_fraction": args.a2_high_fraction}}
  print(f"real matrix: order {real.shape[0]}, cond {info['real']['cond']:.3g} "
        f"(damped by eps={EPSILON}: {info['real']['cond_damped']:.3g}); paper's A1: order 1200, cond 37235")
  a2, u2, lam2 = synthetic_a2(args.order, 0, args.a2_high_fraction, args.a2_ratio)

  results = {}
  for name, (a, u, lam) in (("real", (a_real, u_real, lam_real)), ("A2", (a2, u2, lam2))):
    t = time.time()
    results[name] = measure_matrix(a, u, lam)
    timings[f"errors_{name}_s"] = time.time() - t
    print(f"  {name}: errors measured in {timings[f'errors_{name}_s']:.1f}s")

  t = time.time()
  fig3 = {real_name: {label: bjorck_curves(u_real, lam_real, mapping) for label, mapping in MAPPINGS.items()}}
  if args.fig3_a2:
    fig3["A2"] = {"Linear-2": bjorck_curves(u2, lam2, "linear2")}
  timings["bjorck_fig_s"] = time.time() - t

  print_two_matrix_table("Table 5 (4-bit; Table 1's 4-bit rows are its A/U/U+OR rows) — block 64, "
                         "f(A) = A^(-1/4)", results, "nre", "ae", PAPER_T5, real_name)
  print_two_matrix_table("Table 6 — 4-bit, block 64, f(A) = A^(-1/4) - Diag(diag(A^(-1/4)))",
                         results, "nre_offdiag", "ae_offdiag", PAPER_T6, real_name)
  print_table7(results, real_name)
  print_table1_8bit(results, real_name)
  print_bits_table(results, real_name)
  print("\nFig. 3 — Björck: mean |(VΛˢVᵀ)^(-1/s)(VΛVᵀ) − I| for t2 = 0..5 (4-bit, block 64)")
  for matrix, by_mapping in fig3.items():
    for label, curves in by_mapping.items():
      for s, values in curves.items():
        print(f"  {matrix:8s} {label:9s} s={s:6s} " + " ".join(f"{v:9.2e}" for v in values))
  checks = check_orderings(results)
  print_checks(checks)
  not_accepted = [(m, s, mode) for m, r in results.items() for s, rows in r["modes"].items()
                  for mode, v in rows.items() if not v["accepted"]]
  if not_accepted:
    print(f"\nWARNING: refreshes rejected as non-finite (root kept as identity): {not_accepted}")
  timings["total_s"] = time.time() - t_start
  print(f"\ntotal time {timings['total_s']:.0f}s")

  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  payload = {
      "epsilon": EPSILON, "matrices": info, "settings": [list(s) for s in SETTINGS],
      "modes": list(MODES), "mappings": MAPPINGS, "bjorck_t2": BJORCK_T2, "results": results,
      "paper": {"table5": PAPER_T5, "table6": PAPER_T6, "table7": PAPER_T7,
                "table1_8bit_A": PAPER_T1_8BIT,
                "columns": {"table5": ["A1 NRE", "A1 AE", "A2 NRE", "A2 AE"],
                            "table6": ["A1 NRE", "A1 AE", "A2 NRE", "A2 AE"],
                            "table7": ["NRE f", "AE f", "NRE offdiag", "AE offdiag"],
                            "table1_8bit_A": ["A1 NRE", "A1 AE", "A2 NRE", "A2 AE"]}},
      "fig3_bjorck": {"t2": list(FIG3_STEPS), "curves": fig3},
      "orderings": checks, "timings_s": timings,
      "jax": jax.__version__, "backend": jax.default_backend(),
  }
  out.write_text(json.dumps(payload, indent=1))
  print(f"wrote {out}")
  if args.png:
    plot_bjorck(fig3, pathlib.Path(args.png))
    print(f"wrote {args.png}")
  return payload


if __name__ == "__main__":
  main()
