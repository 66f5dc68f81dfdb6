"""Per-step optimizer time on a small decoder-only transformer, as ratios to AdamW from one run.

Run:  python benchmarks/speed.py [--steps 10] [--repeats 5] [--budget 5] [--model-size small|tiny|micro]
                                 [--skip-peers] [--skip-profile]
                                 [--note TEXT] [--out benchmarks/results/speed.json] [--png ...speed.png]

Needs the peers for the full table: ``pip install precondition-opt psgdax`` (neither changes the
jax/optax versions); without them, or with ``--skip-peers``, their rows are skipped or recorded
as errors.

What is timed: ``jax.jit`` of one optimizer step,
``updates, state = opt.update(grads, state, params); params = optax.apply_updates(params, updates)``,
on the parameter tree of a GPT-style decoder (``tiny``, the default: 2 layers, d_model 128,
MLP 512, vocab 256, context 64 -- the shapes of example 2, ``examples/transformer_lm.py``;
``small``: 4 layers, 256, 1024, 512, 128, 3.7M parameters; ``micro``: 1 layer, 32, 64, 64, 16, for smoke runs),
with random parameters and fixed random gradients. A second table times *whole training
steps* (forward + backward + update) of example 2's model on real byte batches (``--train-batches``),
because that is what a user waits for: the optimizer's share shrinks as the batch grows. Optimizers: ``optax.adamw`` (the baseline:
every ratio is against its median step time), ours (``s4.adamw_shampoo4`` in the ``fp32``,
``naive`` and ``eigen`` state formats, rows ``adamw+shampoo32``, ``adamw+naive4``, ``adamw+shampoo4``:
every row of ours is named as in ``examples/variants.py``; max order 1024 so no dimension is split;
the eigen format also with each statistics-refresh method, see ``SHAMPOO_ROWS``: ``refresh_stats`` is
then the cost of one refresh by that method and ``amortized`` its per-step cost at T1/T2 = 100/500), and the peers
``precondition.distributed_shampoo`` (fp32 and its int8/int16 ``best_effort_memory_usage_reduction``
mode; block size 1024 = our max order; RMSProp-normalized grafting) and ``psgdax.kron``.

Method
------
* **Fixed input state, repeated calls.** Every timed call gets the *same* ``(params, state,
  grads)``; outputs are discarded. A step's branch (refresh or not) depends only on the step
  counter in the state, so repeating one call repeats one kind of step. Before timing, each
  optimizer's state is warmed up by ``--warmup`` (6) steps of its every-step-refresh variant on 4
  distinct random gradients (so the Kronecker statistics are full rank, the roots non-trivial and
  the iterative root solvers take a realistic number of iterations); the warmed state (counter 6)
  is then shared by all variants of that optimizer (the state tree does not depend on T1/T2).
* **Three variants per Shampoo**, each a separate jitted program built with different
  ``(T1, T2)`` = (statistics, root) refresh intervals; ``HUGE`` = 2**30:

  - ``plain``: (100, 500), the paper's setting; at counter 6 neither refresh fires, so this is
    the every-step cost (preconditioning with the stored roots, grafting, AdamW).
  - ``stats``: (1, HUGE): a statistics refresh (T1) every step, no root refresh.
  - ``full``: (1, 1): both refreshes every step (the worst case, and the "refresh step").

  Then ``refresh_stats = stats - plain``, ``refresh_root = full - stats`` and the amortized
  per-step cost at the paper's intervals is
  ``plain + refresh_stats / 100 + refresh_root / 500`` (negative differences from timing noise
  are clipped to 0). For ours a skipped refresh is a ``lax.cond`` branch not taken, so ``plain``
  of the (100, 500) program is the cost of a non-refresh step of that very program.
  distributed_shampoo counts from 0 and refreshes when ``count % T == 0``, with the same
  (100, 500) / (1, HUGE) / (1, 1) programs. PSGD-Kron has one combined preconditioner update,
  fired with probability ``p`` from a PRNG key in the state (fixed here): ``plain`` is ``p = 0``,
  ``full`` is ``p = 1``, and its amortized cost uses ``p = 1/100`` (one update per T1 steps, as
  often as our statistics refresh; psgdax's default schedule anneals ``p`` from 1 to 0.03).
* **SOAP** (``soap32`` / ``soap4``: ``s4.soap4`` with a float32 / 4-bit eigenbasis, max
  order 1024): ``plain`` has the basis-refresh interval 10 (SOAP's default; at counter 6 no refresh
  fires: rotate into the basis, Adam, rotate back), ``full`` refreshes every step (sort, fold the
  Gram matrices, one QR step, re-project the first moment); amortized as ``plain + (full -
  plain) / 10``. Compare ``soap4`` plain with ``adamw+shampoo4`` plain (4-bit Shampoo's step).
  Also ``soap4_bjorck11`` (a Björck step on the 16- and 8-bit rows at every step, ``bjorck_steps=(1, 1)``: the
  default before), ``soap4_m8`` (8-bit Adam moments) and ``soap4_nohead``, see ``SOAP_ROWS``.
* **Other variants** (``SHAMPOO_ROWS``, the same three programs): ``adamw+shampoo4_noroot``
  (``store_root=False``: the root applied from the eigenpairs at every step, as :math:`W(W^\top G)`),
  ``adamw+shampoo8_noroot`` (the same with an 8-bit basis and no Björck step: ``distributed_shampoo4``'s
  quantized layout), ``adamw+shampoo8_eigvals_head`` (``store_root="eigvals"`` on an 8-bit basis with a
  16-bit head and ``bjorck_steps=(1, 1)``: the paper layout's bytes), ``adamw+shampoo4_caspr``,
  ``adamw+shampoo3`` and ``adamw+naive4_jorge`` (Jorge's root update at every statistics refresh).
  Rows of earlier runs (``benchmarks/results/speed*.json``) carry the older labels (``ours eigen``,
  ``ours soap4 no head``, ...); ``variants.LEGACY_NAMES`` maps them, and ``--only`` accepts them.
* **Interleaving.** All compiled programs are timed round-robin: in each of ``--repeats`` rounds
  every program runs ``--steps`` calls (each call timed alone with ``block_until_ready``; fewer,
  but at least one, once its calls in that round took ``--budget`` seconds), the order rotating
  between rounds, so a load change on a shared machine hits all optimizers alike. The reported
  time is the median over all calls; ratios are of medians from the same run.
* **Compile time** is ``jax.jit(step).lower(...).compile()`` wall time of the (100, 500) program
  (each variant's compile is in the JSON).
* **Profile of our every-step path** (eigen and naive formats): jitted, interleaved timings of
  (a) dequantizing every root bucket (``fct.load``: unpack nibbles + codebook lookup + scale,
  diagonal put back), (b) the preconditioning ``L̂ G R̂`` products and grafting of all leaves from
  already-dense roots, (c) the whole ``scale_by_shampoo4`` non-refresh update, (d) AdamW alone.

* **Scratch** (``scratch MiB``, ``plain_scratch_mib``): the temporary buffer XLA allocates at every
  call of the plain program (``compiled.memory_analysis().temp_size_in_bytes``; it covers the
  untaken refresh branch too). On CPU it comes from ``malloc``, and glibc serves requests above its
  mmap threshold (at most 32 MiB) with a fresh mapping each call, page-faulted in as the step touches
  it: a step whose scratch crosses 32 MiB pays for that on every call (4-bit SOAP's plain step was
  over 32 MiB and ran 2.7x 4-bit Shampoo's before the refreshes were sequenced bucket after
  bucket, see ``engine.after_previous``; ``MALLOC_MMAP_THRESHOLD_=1073741824`` in the environment
  raises the threshold). The JSON records any ``MALLOC_*`` variables set.
* **OpenBLAS threads**: the script sets ``OPENBLAS_NUM_THREADS=1`` unless already set: jaxlib's
  CPU LAPACK (the QR of our eigen refresh) runs on scipy's OpenBLAS, whose own threads oversubscribe the cores
  next to XLA's pool (eigen statistics refresh 2-80 s a step instead of 0.34 s, tiny model, 2
  shared cores).

Numbers are wall-clock on whatever machine runs this; the JSON records the device, versions,
settings and the load average before and after, and ``--note`` text (e.g. that the machine was
shared with other jobs).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import io
import json
import os
import pathlib
import platform
import sys
import time
import traceback
import warnings

# jaxlib's CPU LAPACK kernels (our eigen refresh's QR) run on scipy's multithreaded OpenBLAS; its
# threads on top of XLA's own pool oversubscribe the cores: on this 2-core machine an eigen
# statistics refresh took 2-80 s per step instead of ~0.34 s. Must be set before jax loads it;
# an explicit setting in the environment wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import optax_shampoo4 as s4  # noqa: E402
from optax_shampoo4 import factors as fct  # noqa: E402
from optax_shampoo4 import partition  # noqa: E402
from optax_shampoo4 import preconditioning as s4_preconditioning  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import variants  # noqa: E402  (examples/variants.py: the optimizer names)

HUGE = 2**30
T1, T2 = 100, 500
SOAP_EVERY = 10  # SOAP's default basis-refresh interval
LR = 1e-3
MAX_ORDER = 1024
NUM_WARMUP_GRADS = 4

MODEL_SIZES = {
    "small": dict(layers=4, d_model=256, mlp=1024, vocab=512, context=128),
    "tiny": dict(layers=2, d_model=128, mlp=512, vocab=256, context=64),
    # a smoke run's size (benchmarks/gpu_check.sh --tiny): the fewest factors that still include 4-bit ones
    "micro": dict(layers=1, d_model=32, mlp=64, vocab=64, context=16),
}


# ----------------------------------------------------------------------------- model


def decoder_params(key: jax.Array, layers: int, d_model: int, mlp: int, vocab: int,
                   context: int) -> dict:
  """GPT-style decoder parameters (Flax ``(in, out)`` kernels), random N(0, 0.02²).

  Token and position tables, per layer LayerNorm/QKV/output/MLP with biases, a final
  LayerNorm and an untied ``(d_model, vocab)`` head.
  """
  shapes = {"wte": (vocab, d_model), "wpe": (context, d_model)}
  for i in range(layers):
    for name, shape in {
        "ln_1/scale": (d_model,), "ln_1/bias": (d_model,),
        "attn/qkv/kernel": (d_model, 3 * d_model), "attn/qkv/bias": (3 * d_model,),
        "attn/proj/kernel": (d_model, d_model), "attn/proj/bias": (d_model,),
        "ln_2/scale": (d_model,), "ln_2/bias": (d_model,),
        "mlp/fc/kernel": (d_model, mlp), "mlp/fc/bias": (mlp,),
        "mlp/proj/kernel": (mlp, d_model), "mlp/proj/bias": (d_model,),
    }.items():
      shapes[f"h{i}/{name}"] = shape
  shapes.update({"ln_f/scale": (d_model,), "ln_f/bias": (d_model,), "lm_head": (d_model, vocab)})
  keys = jax.random.split(key, len(shapes))
  flat = {name: 0.02 * jax.random.normal(k, shape, jnp.float32)
          for (name, shape), k in zip(shapes.items(), keys)}
  tree: dict = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def random_like(key: jax.Array, tree, scale: float = 1e-2):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
      treedef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


# ----------------------------------------------------------------------------- optimizers


def _peer_shim() -> None:
  """Runtime compatibility for precondition-opt 0.3.0 on jax >= 0.6 (benchmark only).

  Restores the removed ``jax.tree_map``-style aliases it calls, and the old
  ``optax._src.clipping`` module path. Nothing installed is modified.
  """
  import jax.tree_util as tu

  for old, new in {"tree_map": tu.tree_map, "tree_flatten": tu.tree_flatten,
                   "tree_unflatten": tu.tree_unflatten, "tree_leaves": tu.tree_leaves,
                   "tree_structure": tu.tree_structure}.items():
    try:
      getattr(jax, old)
    except AttributeError:
      setattr(jax, old, new)
  import optax._src as _src
  import optax.transforms._clipping as _clipping

  sys.modules.setdefault("optax._src.clipping", _clipping)
  _src.clipping = _clipping


# Our rows by their names in examples/variants.py. The state formats (--formats picks among them):
FORMATS = {"fp32": "adamw+shampoo32", "naive": "adamw+naive4", "eigen": "adamw+shampoo4"}
# Further Shampoo rows, the same three programs: the eigen format's refresh methods (the paper's one QR step,
# four QR steps, an exact eigh at every statistics update, and the adaptive rule at its two extremes: tolerance 0
# decomposes at every update, its worst case; 1 always keeps the basis, its best case; the default tolerance lies
# in between, data-dependent); no stored root (formed from the eigenpairs at every step); CASPR's combination;
# 3-bit eigenvectors; Jorge's matmul-only root update (naive format: the 4-bit root is refreshed at every
# statistics update, no decomposition, no Newton loop); and the memory headline's configurations, 8-bit Adam
# moments with and without a stored root.
SHAMPOO_ROWS = ("adamw+shampoo4_qr", "adamw+shampoo4_qr4", "adamw+shampoo4_eigh", "adamw+shampoo4_adaptive_tol0",
                "adamw+shampoo4_adaptive_tol1", "adamw+shampoo4_noroot", "adamw+shampoo8_noroot",
                "adamw+shampoo8_eigvals_head", "adamw+shampoo4_caspr", "adamw+shampoo3",
                "adamw+naive4_jorge", "adamw+shampoo4_m8", "adamw+shampoo4_noroot_m8")
# SOAP rows: float32 and 4-bit eigenbasis; a Björck step on the 16- and 8-bit rows at every step
# (bjorck_steps=(1, 1), the default before); 8-bit Adam moments; every basis row in 4 bits (head_fraction=0); an
# 8-bit head and no second tier (the layout before the 16-/8-bit tiers).
SOAP_ROWS = ("soap32", "soap4", "soap4_bjorck11", "soap4_m8", "soap4_nohead", "soap4_head8")
PEERS = ("distributed_shampoo", "distributed_shampoo int8", "psgdax kron")
WEIGHT_DECAY = 1e-4  # optax.adamw's and s4.adamw_shampoo4's default
SOAP_WEIGHT_DECAY = 1e-2  # s4.soap4's default


def _shampoo(name: str):
  def make(t1, t2):
    return variants.make(name, LR, WEIGHT_DECAY,
                         shampoo={"max_order": MAX_ORDER, "stats_every": t1, "root_every": t2})
  return make


def _soap(name: str):
  def make(every):
    return variants.make(name, LR, SOAP_WEIGHT_DECAY, soap={"max_order": MAX_ORDER, "precondition_every": every})
  return make


def _refresh_programs(make) -> dict:
  """The three programs of a (T1, T2) optimizer: no refresh, a statistics refresh, both refreshes."""
  return {"plain": lambda: make(T1, T2), "stats": lambda: make(1, HUGE), "full": lambda: make(1, 1)}


def _distributed_shampoo(int8: bool):
  _peer_shim()
  from precondition.distributed_shampoo import GraftingType, distributed_shampoo

  def make(t1, t2):
    return distributed_shampoo(
        learning_rate=LR, block_size=MAX_ORDER, statistics_compute_steps=t1,
        preconditioning_compute_steps=t2, graft_type=GraftingType.RMSPROP_NORMALIZED,
        best_effort_memory_usage_reduction=int8)
  return make


def _psgd_kron():
  from psgdax import kron

  def make(p):
    return kron(learning_rate=LR, preconditioner_update_probability=p)
  return make


def optimizer_families(skip_peers: bool, formats=tuple(FORMATS)) -> dict:
  """``{name: {"kind", "variants": {variant: () -> opt}, ...}}``; a variant may be missing."""
  families = {"adamw": {"kind": "baseline", "variants": {"plain": lambda: variants.make("adamw", LR, WEIGHT_DECAY)}},
              # AdamW with 8-bit moments (s4.moments): the first-order cost of moment_bits=8.
              "adamw_m8": {"kind": "ours", "variants": {"plain": lambda: variants.make("adamw_m8", LR, WEIGHT_DECAY)}}}
  for name in [FORMATS[fmt] for fmt in formats] + list(SHAMPOO_ROWS):
    families[name] = {"kind": "ours", "variants": _refresh_programs(_shampoo(name))}
  # SOAP: "plain" = a step without a basis refresh (interval 10, counter 6), "full" = one with it
  # (interval 1); amortized at SOAP's default interval 10.
  for name in SOAP_ROWS:
    make = _soap(name)
    families[name] = {"kind": "ours", "amortize_p": 1.0 / SOAP_EVERY, "variants": {
        "plain": lambda make=make: make(SOAP_EVERY), "full": lambda make=make: make(1)}}
  if not skip_peers:
    families.update(peer_families())
  return families


def peer_families() -> dict:
  """distributed_shampoo (fp32 and int8) and PSGD-Kron; a peer that fails to load is recorded as an error."""
  families = {}
  for name, int8 in zip(PEERS[:2], (False, True)):
    try:
      families[name] = {"kind": "peer", "variants": _refresh_programs(_distributed_shampoo(int8))}
    except Exception as e:  # noqa: BLE001 - a peer failing must not stop the benchmark
      families[name] = {"kind": "peer", "error": _error_text(e), "variants": {}}
  try:
    make = _psgd_kron()
    families[PEERS[2]] = {"kind": "peer", "amortize_p": 1.0 / T1, "variants": {
        "plain": lambda: make(0.0), "full": lambda: make(1.0)}}
  except Exception as e:  # noqa: BLE001
    families[PEERS[2]] = {"kind": "peer", "error": _error_text(e), "variants": {}}
  return families


def _error_text(e: BaseException) -> str:
  tb = traceback.extract_tb(e.__traceback__)
  where = f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""
  return f"{type(e).__name__}: {e}{where}"


def _peer_versions() -> dict:
  out = {}
  for dist in ("precondition-opt", "psgdax"):
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      out[dist] = None
  return out


# ----------------------------------------------------------------------------- timing


def make_step(opt):
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def _progress(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _quiet():
  """Silences peers' prints (psgdax logs sizes at init) and float64 warnings."""
  with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
    warnings.simplefilter("ignore")
    yield


def prepare_family(family: dict, params, grads_list, warmup: int) -> dict:
  """Warms up a state with the family's refresh-every-step variant, compiles every variant."""
  variants = family["variants"]
  warm_name = "full" if "full" in variants else "plain"
  with _quiet():
    state = variants[warm_name]().init(params)  # same state tree for every variant
    compiled, compile_s, scratch = {}, {}, {}
    for name, factory in variants.items():
      _progress(f"  compiling {name}")
      step = jax.jit(make_step(factory()))
      t0 = time.perf_counter()
      compiled[name] = step.lower(params, state, grads_list[0]).compile()
      compile_s[name] = time.perf_counter() - t0
      analysis = compiled[name].memory_analysis()
      scratch[name] = None if analysis is None else int(analysis.temp_size_in_bytes)
    _progress(f"  warm-up ({warm_name}, {warmup} steps)")
    for i in range(warmup):
      _, state = compiled[warm_name](params, state, grads_list[i % len(grads_list)])
    jax.block_until_ready(state)
    for name in variants:
      out = compiled[name](params, state, grads_list[0])  # first run (allocations)
      jax.block_until_ready(out)
      bad = [x for x in jax.tree.leaves(out[0]) if not bool(jnp.all(jnp.isfinite(x)))]
      if bad:
        raise FloatingPointError(f"variant {name!r} produced non-finite parameters")
  return {"state": state, "compiled": compiled, "compile_s": compile_s, "scratch_bytes": scratch}


def time_interleaved(programs: dict, steps: int, repeats: int, budget_s: float = float("inf")) -> dict:
  """``{key: (callable, args)}`` -> ``{key: [seconds per call, ...]}``, round-robin.

  Each round runs every program ``steps`` times, or fewer (at least once) when its calls in
  that round have already taken ``budget_s`` seconds, so slow refresh steps still get one
  sample per round without dominating the run time.
  """
  keys = list(programs)
  samples = {k: [] for k in keys}
  for r in range(repeats):
    shift = r % len(keys)
    for k in keys[shift:] + keys[:shift]:
      fn, args = programs[k]
      spent = 0.0
      for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        dt = time.perf_counter() - t0
        samples[k].append(dt)
        spent += dt
        if spent >= budget_s:
          break
  return samples


def _stats(samples) -> dict:
  a = np.asarray(samples) * 1e3
  return {"median_ms": float(np.median(a)), "min_ms": float(a.min()),
          "p25_ms": float(np.percentile(a, 25)), "p75_ms": float(np.percentile(a, 75)),
          "n": int(a.size)}


def summarize(name: str, family: dict, times: dict, adamw_ms: float) -> dict:
  plain = times["plain"]["median_ms"]
  row = {"plain_ms": plain, "plain_vs_adamw": plain / adamw_ms}
  if "full" in times:
    full = times["full"]["median_ms"]
    row.update(refresh_step_ms=full, refresh_step_vs_adamw=full / adamw_ms)
    if "stats" in times:
      stats = times["stats"]["median_ms"]
      row["stats_step_ms"] = stats
      row["refresh_stats_ms"] = stats - plain
      row["refresh_root_ms"] = full - stats
      amortized = plain + max(stats - plain, 0.0) / T1 + max(full - stats, 0.0) / T2
      row["amortized_rule"] = f"plain + refresh_stats/{T1} + refresh_root/{T2}"
    else:
      p = family.get("amortize_p", 1.0 / T1)
      row["refresh_ms"] = full - plain
      amortized = plain + p * max(full - plain, 0.0)
      row["amortized_rule"] = f"plain + {p:g} * (full - plain)"
      row["amortized_ms_at_p0.03"] = plain + 0.03 * max(full - plain, 0.0)
    row.update(amortized_ms=amortized, amortized_vs_adamw=amortized / adamw_ms)
  return row


# ----------------------------------------------------------------------------- train step


def train_step_section(batch_sizes, refresh_rows: dict, warmup: int, steps: int, repeats: int,
                       budget_s: float) -> dict:
  """Whole training steps (forward + backward + update) of example 2's transformer LM.

  For AdamW and ours (every format) at (T1, T2) = (100, 500): each program is a jitted
  ``loss_and_grad -> update -> apply`` on a real byte batch of the example's corpus, timed
  interleaved like the optimizer-only table, after ``warmup`` refresh-every-step steps.
  The amortized training step adds the refresh costs measured in the optimizer-only table
  (they do not depend on the batch): ``plain + refresh_stats/T1 + refresh_root/T2``.
  """
  from flax import nnx

  from benchmarks.quality import load_example

  lm = load_example("transformer_lm")
  model = lm.TransformerLM(nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  corpus = lm.load_corpus()
  rng = np.random.default_rng(0)

  def loss_fn(params, tokens):
    return lm.next_byte_loss(nnx.merge(graphdef, params), tokens)

  def train_step(opt):
    def step(params, state, tokens):
      loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss
    return step

  makers = {"adamw": (lambda: variants.make("adamw", LR, WEIGHT_DECAY),) * 2}
  for name in FORMATS.values():
    make = _shampoo(name)
    makers[name] = (lambda make=make: make(T1, T2), lambda make=make: make(1, 1))
  programs = {}
  for batch in batch_sizes:
    starts = rng.integers(0, corpus.size - 65, size=(warmup + 1, batch))
    batches = [jnp.asarray(lm.windows(corpus, st, 65)) for st in starts]
    for name, (make_plain, make_warm) in makers.items():
      _progress(f"  train step: {name}, batch {batch}")
      state = make_warm().init(params)
      warm = jax.jit(train_step(make_warm()))
      p = params
      for tokens in batches[:warmup]:
        p, state, _ = warm(p, state, tokens)
      jax.block_until_ready(state)
      compiled = jax.jit(train_step(make_plain())).lower(params, state, batches[-1]).compile()
      jax.block_until_ready(compiled(params, state, batches[-1]))
      programs[(name, batch)] = (compiled, (params, state, batches[-1]))
  samples = time_interleaved(programs, steps, repeats, budget_s)
  rows = {}
  for batch in batch_sizes:
    adamw_ms = _stats(samples[("adamw", batch)])["median_ms"]
    for name in makers:
      plain = _stats(samples[(name, batch)])["median_ms"]
      ref = refresh_rows.get(name, {})
      amortized = (plain + max(ref.get("refresh_stats_ms", 0.0), 0.0) / T1
                   + max(ref.get("refresh_root_ms", 0.0), 0.0) / T2)
      rows[f"{name} | batch {batch}"] = {
          "optimizer": name, "batch": batch, "tokens_per_step": batch * 64,
          "plain_ms": plain, "plain_vs_adamw": plain / adamw_ms,
          "amortized_ms": amortized, "amortized_vs_adamw": amortized / adamw_ms}
  return {"rows": rows, "params": int(sum(x.size for x in jax.tree.leaves(params)))}


def print_train_table(section: dict) -> None:
  print(f"\nWhole training step of example 2 (transformer_lm.py, {section['params'] / 1e6:.2f}M params): "
        f"forward + backward + update, (T1, T2) = ({T1}, {T2})")
  print(f"{'optimizer':18s} {'batch':>5s} {'plain ms':>9s} {'amort. ms':>9s} {'plain/adamw':>11s} "
        f"{'amort./adamw':>12s}")
  for r in section["rows"].values():
    print(f"{r['optimizer']:18s} {r['batch']:5d} {r['plain_ms']:9.2f} {r['amortized_ms']:9.2f} "
          f"{r['plain_vs_adamw']:10.2f}x {r['amortized_vs_adamw']:11.2f}x")


# ----------------------------------------------------------------------------- profile


def profile_ours(params, grads_list, states: dict, steps: int, repeats: int, budget_s: float) -> dict:
  """Splits our non-refresh step: dequantize roots vs preconditioning products vs the rest."""
  grads = grads_list[0]
  leaves = jax.tree.leaves(grads)
  shapes = [x.shape for x in leaves]
  plan = partition.make_plan(shapes, MAX_ORDER, 64, True)
  programs, meta = {}, {}
  adam_tail = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-4),
                          optax.scale_by_learning_rate(LR))
  tail_state = adam_tail.init(params)
  tail = jax.jit(make_step(adam_tail)).lower(params, tail_state, grads).compile()
  programs["adam tail (scale_by_adam+wd+lr+apply)"] = (tail, (params, tail_state, grads))
  for fmt, chain_state in states.items():
    shampoo_state = chain_state[0]
    buckets = shampoo_state.factors

    def dequant(buckets):
      return {n: fct.load(b.root) for n, b in buckets.items()}

    dq = jax.jit(dequant).lower(buckets).compile()
    roots = dq(buckets)

    def precondition(roots, grads):
      out = []
      for leaf, lp in zip(jax.tree.leaves(grads), plan.leaves):
        if lp.preconditioned:
          m = leaf.astype(jnp.float32).reshape(lp.matrix_shape)
          out.append(s4_preconditioning.precondition(m, m, lp, roots, False).reshape(leaf.shape).astype(leaf.dtype))
        else:
          out.append(leaf)
      return out

    pc = jax.jit(precondition).lower(roots, grads).compile()
    tx = s4.scale_by_shampoo4(max_order=MAX_ORDER, state_format=fmt, stats_every=T1, root_every=T2)
    upd = jax.jit(lambda g, s, tx=tx: tx.update(g, s)).lower(grads, shampoo_state).compile()
    programs[f"{fmt}: dequantize all roots"] = (dq, (buckets,))
    programs[f"{fmt}: L G R products + grafting (dense roots)"] = (pc, (roots, grads))
    programs[f"{fmt}: scale_by_shampoo4 update (no refresh)"] = (upd, (grads, shampoo_state))
    meta[fmt] = {name: {"factors": int(b.root.diag.shape[0]) if isinstance(b.root, tuple)
                        else int(b.root.shape[0]),
                        "quantized": fct.is_quantized(b.root)} for name, b in buckets.items()}
  samples = time_interleaved(programs, steps, repeats, budget_s)
  return {"buckets": meta, "times": {k: _stats(v) for k, v in samples.items()}}


# ----------------------------------------------------------------------------- output


def print_table(rows: dict, compile_s: dict, errors: dict) -> None:
  print(f"\n{'optimizer':36s} {'compile s':>9s} {'plain ms':>9s} {'stats-refr. ms':>14s} "
        f"{'root-refr. ms':>13s} {'refresh step ms':>15s} {'amort. ms':>9s} {'plain/adamw':>11s} "
        f"{'amort./adamw':>12s} {'refresh/adamw':>13s} {'scratch MiB':>11s}")

  def f(x, fmt):
    width = int(fmt.split(".")[0])
    return "-".rjust(width) if x is None else format(x, fmt)

  for name, r in rows.items():
    label = name if name == "adamw" else f"{name} {T1}/{T2}" if "stats_step_ms" in r else name
    print(f"{label:36s} {f(compile_s.get(name), '9.2f')} {f(r['plain_ms'], '9.2f')} "
          f"{f(r.get('refresh_stats_ms'), '14.2f')} {f(r.get('refresh_root_ms'), '13.2f')} "
          f"{f(r.get('refresh_step_ms'), '15.2f')} {f(r.get('amortized_ms'), '9.2f')} "
          f"{f(r['plain_vs_adamw'], '10.2f')}x {f(r.get('amortized_vs_adamw'), '11.2f')}x "
          f"{f(r.get('refresh_step_vs_adamw'), '12.2f')}x".replace("-x", "- ")
          + f" {f(r.get('plain_scratch_mib'), '11.1f')}")
  for name, err in errors.items():
    print(f"{name:36s} FAILED: {err}")
  print(f"plain: a ({T1}, {T2}) step with no refresh; stats-/root-refr.: extra cost of a statistics "
        f"(T1) / root (T2) refresh;\nrefresh step: T1 = T2 = 1 (both every step; PSGD: update "
        f"probability 1); amort.: plain + stats-refr./{T1} + root-refr./{T2}\n(PSGD: plain + "
        f"(refresh - plain)/{T1}); medians of interleaved calls, ratios vs the AdamW median.")


def print_profile(profile: dict) -> None:
  print("\nProfile of our non-refresh step (median ms):")
  for name, t in profile["times"].items():
    print(f"  {name:52s} {t['median_ms']:8.2f}")


def plot(rows: dict, compile_s: dict, path: pathlib.Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(rows)
  x = np.arange(len(names))
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [3, 1.4]})
  series = [("plain_vs_adamw", "plain step", "#2ca02c"),
            ("amortized_vs_adamw", f"amortized at {T1}/{T2} (PSGD: p=1/{T1})", "#1f77b4"),
            ("refresh_step_vs_adamw", "refresh step (T1=T2=1 / p=1)", "#d62728")]
  width = 0.27
  for i, (key, label, color) in enumerate(series):
    vals = [rows[n].get(key, np.nan) for n in names]
    ax1.bar(x + (i - 1) * width, vals, width, label=label, color=color)
  ax1.axhline(1.0, color="k", lw=0.8, ls="--")
  ax1.set_yscale("log")
  ax1.set_xticks(x, names, rotation=25, ha="right", fontsize=8)
  ax1.set_ylabel("step time / AdamW step time (log)")
  ax1.set_title(title, fontsize=9)
  ax1.legend(fontsize=8)
  ax2.bar(x, [compile_s.get(n, np.nan) for n in names], color="#777777")
  ax2.set_xticks(x, names, rotation=25, ha="right", fontsize=8)
  ax2.set_ylabel("jit lower+compile (s), (T1, T2) = (100, 500) program")
  ax2.set_title("Compile time", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10, help="timed calls per program per round")
  parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
  parser.add_argument("--budget", type=float, default=5.0,
                      help="seconds per program per round after which its remaining calls are skipped")
  parser.add_argument("--warmup", type=int, default=6, help="state warm-up steps (refresh every step)")
  parser.add_argument("--model-size", default="tiny", choices=list(MODEL_SIZES))
  parser.add_argument("--skip-peers", action="store_true")
  parser.add_argument("--skip-profile", action="store_true")
  parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS),
                      help="our state formats to time (the profile needs eigen and naive)")
  parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                      help="time only these optimizer rows (AdamW, the baseline, always), by their names in "
                           "examples/variants.py or the peers' (the labels of earlier runs, e.g. 'ours eigen', "
                           "are accepted too), e.g. --only adamw+shampoo4 soap4")
  parser.add_argument("--train-batches", type=int, nargs="*", default=[4, 16],
                      help="batch sizes for the whole-training-step table (none: skip it)")
  parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
  results_dir = pathlib.Path(__file__).parent / "results"
  parser.add_argument("--out", default=str(results_dir / "speed.json"))
  parser.add_argument("--png", default=None, help="default: --out with .png; '' to skip the plot")
  args = parser.parse_args(argv)
  if args.warmup < 1:
    parser.error("--warmup must be >= 1 (distributed_shampoo refreshes at count 0)")
  if args.only:
    args.only = [variants.LEGACY_NAMES.get(name, name) for name in args.only]
    known = set(optimizer_families(skip_peers=True)) | set(PEERS)
    if set(args.only) - known:
      parser.error(f"--only: unknown rows {sorted(set(args.only) - known)}; choose from {sorted(known)}")
  return args


def prepare_all(families: dict, params, grads_list, warmup: int) -> tuple[dict, dict]:
  """``(prepared, errors)``: each family's warmed state and compiled programs; a failing peer goes to errors."""
  prepared, errors = {}, {}
  for name, family in families.items():
    if "error" in family:
      errors[name] = family["error"]
      continue
    t0 = time.perf_counter()
    _progress(f"{name}:")
    try:
      prepared[name] = prepare_family(family, params, grads_list, warmup)
    except Exception as e:  # noqa: BLE001 - record a failing peer, keep going
      if family["kind"] != "peer":
        raise
      errors[name] = _error_text(e)
      print(f"{name}: FAILED: {errors[name]}")
      continue
    print(f"{name}: warm-up + compile {time.perf_counter() - t0:.1f}s "
          f"({', '.join(f'{k} {v:.2f}s' for k, v in prepared[name]['compile_s'].items())})")
  return prepared, errors


def optimizer_table(families: dict, prepared: dict, params, grads_list, args) -> tuple[dict, dict]:
  """Times every prepared program interleaved: ``(rows, times)``; then releases the executables."""
  programs = {(name, v): (fn, (params, p["state"], grads_list[0]))
              for name, p in prepared.items() for v, fn in p["compiled"].items()}
  _progress(f"timing {len(programs)} programs: {args.repeats} rounds x {args.steps} calls")
  samples = time_interleaved(programs, args.steps, args.repeats, args.budget)
  times = {name: {v: _stats(samples[(name, v)]) for v in p["compiled"]}
           for name, p in prepared.items()}
  adamw_ms = times["adamw"]["plain"]["median_ms"]
  rows = {name: summarize(name, families[name], t, adamw_ms) for name, t in times.items()}
  for name, p in prepared.items():  # XLA's per-call scratch of the plain program (see the module doc)
    scratch_bytes = p["scratch_bytes"].get("plain")
    rows[name]["plain_scratch_mib"] = None if scratch_bytes is None else scratch_bytes / 2**20
  # Release the timed executables before compiling more: each holds JIT code mappings, and the full run's
  # 60-odd programs plus the sections below exceeded the kernel's map count (vm.max_map_count), which LLVM
  # reports as "Cannot allocate memory".
  del programs
  for p in prepared.values():
    p["compiled"].clear()
  gc.collect()
  jax.clear_caches()
  return rows, times


def later_sections(args, prepared: dict, rows: dict, params, grads_list) -> tuple[dict | None, dict | None]:
  """``(profile, train_step)``: the profile of our non-refresh step and the whole-training-step table."""
  profile = None
  profiled = {fmt: FORMATS[fmt] for fmt in ("eigen", "naive")}
  if not args.skip_profile and all(name in prepared for name in profiled.values()):
    states = {fmt: prepared[name]["state"] for fmt, name in profiled.items()}
    _progress("profiling our non-refresh step")
    profile = profile_ours(params, grads_list, states, args.steps, args.repeats, args.budget)
    print_profile(profile)
  train = None
  if args.train_batches:
    _progress("whole training steps")
    train = train_step_section(args.train_batches, rows, args.warmup, args.steps, args.repeats,
                               args.budget)
    print_train_table(train)
  return profile, train


def environment(load_before, load_after) -> dict:
  """Versions, device, thread and allocator settings, load averages."""
  return {"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"),
          "optax": optax.__version__, "numpy": np.__version__, "python": platform.python_version(),
          "peers": _peer_versions(), "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()],
          "device_kind": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
          "machine": platform.machine(), "platform": platform.platform(),
          "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
          "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
          "malloc": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
          "loadavg_before": load_before, "loadavg_after": load_after}


def write_outputs(args, result: dict, title: str) -> None:
  """The JSON at ``--out`` and the bar chart at ``--png`` (default: next to it)."""
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2))
  print(f"\nwrote {out}")
  png = out.with_suffix(".png") if args.png is None else (pathlib.Path(args.png) if args.png else None)
  if png:
    plot(result["rows"], {name: c["plain"] for name, c in result["compile_s"].items()}, png, title)
    print(f"wrote {png}")


def main(argv=None) -> dict:
  args = parse_args(argv)
  load_before = os.getloadavg()
  cfg = MODEL_SIZES[args.model_size]
  pkey, *gkeys = jax.random.split(jax.random.key(0), NUM_WARMUP_GRADS + 1)
  params = decoder_params(pkey, **cfg)
  grads_list = [random_like(k, params) for k in gkeys]
  n_params = int(sum(x.size for x in jax.tree.leaves(params)))
  print(f"model {args.model_size}: {cfg}, {n_params / 1e6:.2f}M parameters; device {jax.devices()[0]}; "
        f"jax {jax.__version__}, optax {optax.__version__}")

  families = optimizer_families(args.skip_peers, args.formats)
  if args.only:
    families = {name: f for name, f in families.items() if name == "adamw" or name in args.only}
  prepared, errors = prepare_all(families, params, grads_list, args.warmup)
  rows, times = optimizer_table(families, prepared, params, grads_list, args)
  compile_s = {name: p["compile_s"]["plain"] for name, p in prepared.items()}
  print_table(rows, compile_s, errors)
  profile, train = later_sections(args, prepared, rows, params, grads_list)

  result = {
      "settings": {"model_size": args.model_size, "model": cfg, "params": n_params,
                   "steps": args.steps, "repeats": args.repeats, "budget_s": args.budget,
                   "warmup": args.warmup,
                   "T1": T1, "T2": T2, "huge": HUGE, "learning_rate": LR, "max_order": MAX_ORDER,
                   "peer_block_size": MAX_ORDER, "skip_peers": args.skip_peers},
      "environment": environment(load_before, os.getloadavg()),
      "note": args.note,
      "method": __doc__.split("Method\n------\n", 1)[1],
      "rows": rows,
      "compile_s": {name: p["compile_s"] for name, p in prepared.items()},
      "scratch_bytes": {name: p["scratch_bytes"] for name, p in prepared.items()},
      "times": times,
      "errors": errors,
      "profile": profile,
      "train_step": train,
  }
  adamw_ms = times["adamw"]["plain"]["median_ms"]
  write_outputs(args, result, f"{args.model_size} decoder ({n_params / 1e6:.1f}M params), "
                              f"{jax.devices()[0].device_kind}, AdamW {adamw_ms:.2f} ms/step")
  return result


if __name__ == "__main__":
  main()
