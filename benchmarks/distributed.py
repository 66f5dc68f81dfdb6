"""Per-device optimizer-state bytes and refresh time vs. device count (1, 2, 4, 8).

Run:  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/distributed.py
      python benchmarks/distributed.py --devices 1 2 4 8 --bytes-model gpt2_124m [--out ...json]
      python benchmarks/distributed.py --skip-timing   # exact tables only (bytes, flops): no timing

(The script asks for 8 virtual CPU devices itself when ``XLA_FLAGS`` does not say otherwise.)

The tables:

1. **Bytes per device** (exact, no allocation): the 4-bit ``adamw_shampoo4`` state of a
   parameter tree from ``benchmarks/model_shapes.py`` (default GPT-2 124M), built with
   ``mesh=`` a 1-D mesh of N devices and placed with ``s4.state_sharding``; for each leaf the
   shape of the shard on one device (``NamedSharding.shard_shape``) times its item size, split
   into Shampoo factors (codes, scales, eigenvalues, diagonals) and the rest (AdamW moments,
   replicated in data parallelism). The factor bytes fall as ``ceil(k / N) / k`` per bucket of
   ``k`` factors (padding to a multiple of N is counted).
2. **Refresh time** (measured, ``--time-model``, default the 4-layer d_model 256 decoder of
   ``benchmarks/speed.py``, 3.7M parameters): each device count runs in its own subprocess
   (one mesh size per process; XLA's in-process CPU collectives must not mix programs of
   several meshes), allocates the sharded state, warms it up with 3 refresh-every-step
   updates and times, interleaved, the jitted update with T1 = T2 = 1 (statistics QR + roots
   every step: the refresh step) and with T1/T2 = 100/500 at a non-refresh step (the plain
   step), with ``out_shardings`` = the state shardings. The allocated per-device bytes of that
   state are checked against the exact count. On virtual CPU devices all "devices" share the
   same cores, so the times show that the work is split (each device refreshes 1/N of the
   factors: the refresh time should not grow with N) but not a speed-up; on a multi-GPU host
   the same script measures the real one.

3. **Every-step matrix-product flops per device** (exact, from compiled programs, no timing;
   ``--flops-model``, default GPT-2 124M): the per-step preconditioning ``L̂ G R̂`` of
   ``scale_by_shampoo4(mesh=<N devices>)`` is split over the devices by a static schedule
   (``s4.partition.make_schedule``; ``FactorEngine.apply_blocks``). For N = 1 (no mesh) and each
   N, the program is compiled and the ``dot`` flops of its per-device HLO are counted
   (``benchmarks/hlo_flops.py``), next to XLA's ``cost_analysis()["flops"]`` and the schedule's
   load balance (per-device cost over an even split, padding counted). ``--flops-program step``
   (default) compiles the every-step part alone (``apply_blocks`` with Shampoo's product, as the
   transform calls it; about a minute per N on 2 cores); ``update`` compiles the whole
   ``tx.update`` and counts the dots outside the gated refresh branches (same numbers, several
   minutes per N for GPT-2: the refresh branches dominate compilation). ``--flops-only`` computes this
   table alone and adds it to an existing JSON (``flops``).

4. **Statistics-step matrix-product flops per device** (exact, from compiled programs, no timing;
   ``--flops-model``): ``FactorEngine.refresh_stats`` (4-bit eigen factors, max order 1024: the
   Gram matrices ``G Gᵀ`` / ``Gᵀ G`` and the QR refresh's products) compiled for N = 1 and each N;
   each device forms only the Gram matrices of the factors it owns (``optax_shampoo4/owned_grams.py``)
   and refreshes only those factors. ``--stats-flops-only`` computes this table alone and adds it to
   an existing JSON (``stats_flops``).

5. **FSDP train state per device** (exact, no allocation; ``--bytes-model``): parameters split over the
   mesh along their largest dimension divisible by N, Adam's moments like them, the factors over their
   bucket axis; the whole train state (parameters + optimizer state) per device against ``total / N``.
   ``--fsdp-memory-only`` computes this table alone and adds it to an existing JSON (``fsdp_memory``).

6. **FSDP all-gathers** (``--fsdp-gathers-only``, minutes): the whole FSDP ``tx.update`` compiled on the
   largest ``--devices`` and its float all-gathers listed (``benchmarks/hlo_flops.py``): none as large as a
   gradient (the gradient blocks move to their owners by all-to-all); added to the JSON (``fsdp_gathers``).

7. **SOAP's update per device** (``--soap-flops-only``, exact, minutes; ``--flops-model``):
   ``scale_by_soap4``'s whole compiled update (defaults) for N = 1 and each N, its dot flops outside
   the refresh's conditional (a plain step: rotations into and out of the bases, and each device's
   decoding projections of the bases of its own blocks) and inside it, and XLA's scratch bytes per device
   (``memory_analysis().temp_size_in_bytes``); added to the JSON (``soap_flops``).

Writes ``benchmarks/results/distributed.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

# Run as a script only: a test importing the tables has its own devices and must not change its subprocesses' flags.
if __name__ == "__main__":
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see benchmarks/speed.py

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optax_shampoo4 as s4  # noqa: E402
from benchmarks.hlo_flops import all_gathers, dot_flops  # noqa: E402
from benchmarks.model_shapes import MODELS  # noqa: E402
from optax_shampoo4 import engine, linalg  # noqa: E402
from optax_shampoo4 import factors as fct  # noqa: E402

MIB = 2.0**20
LR = 1e-3


def _mesh(n: int) -> jax.sharding.Mesh:
  return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


def _tx(mesh, t1: int = 100, t2: int = 500):
  return s4.adamw_shampoo4(LR, mesh=mesh, stats_every=t1, root_every=t2)


def _is_state(node) -> bool:
  return isinstance(node, s4.ScaleByShampoo4State)


def _split_bytes(abstract_state, shardings) -> dict:
  """Per-device bytes (from each leaf's shard shape) of the Shampoo factors and of the rest."""
  out = {"factors_per_device": 0, "factors_total": 0, "rest_per_device": 0, "rest_total": 0}
  states = [n for n in jax.tree.leaves(abstract_state, is_leaf=_is_state) if _is_state(n)]
  factor_ids = {id(leaf) for st in states for leaf in jax.tree.leaves(st.factors)}
  for leaf, sharding in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(shardings)):
    per_device = int(np.prod(sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
    total = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
    kind = "factors" if id(leaf) in factor_ids else "rest"
    out[f"{kind}_per_device"] += per_device
    out[f"{kind}_total"] += total
  return out


def bytes_table(model: str, device_counts: list[int]) -> dict:
  params = MODELS[model]()
  rows = {}
  for n in device_counts:
    mesh = _mesh(n)
    abstract = jax.eval_shape(_tx(mesh).init, params)
    shardings = s4.state_sharding(abstract, mesh)
    rows[n] = _split_bytes(abstract, shardings)
  one = rows[device_counts[0]]["factors_per_device"]
  for n, r in rows.items():
    r["factors_fraction_of_1_device"] = r["factors_per_device"] / one
    r["ideal_fraction"] = device_counts[0] / n
  return {"model": model, "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
          "rows": rows}


def fsdp_param_sharding(mesh: jax.sharding.Mesh, shape: tuple[int, ...], axis: str = "data") -> NamedSharding:
  """FSDP: a parameter split over ``axis`` along its largest dimension that divides evenly (else replicated)."""
  n = mesh.shape[axis]
  dims = sorted((d for d, size in enumerate(shape) if size % n == 0), key=lambda d: -shape[d])
  if not dims:
    return NamedSharding(mesh, P())
  spec = [None] * len(shape)
  spec[dims[0]] = axis
  return NamedSharding(mesh, P(*spec))


def _per_device_and_total(tree, shardings) -> tuple[int, int]:
  """(bytes on one device, bytes of the whole arrays) of ``tree`` laid out by ``shardings`` (exact)."""
  per_device = total = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    per_device += int(np.prod(sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
    total += int(np.prod(leaf.shape)) * leaf.dtype.itemsize
  return per_device, total


def fsdp_memory_table(model: str, device_counts: list[int]) -> dict:
  """The whole train state (params + 4-bit ``adamw_shampoo4`` state) per device, FSDP-style.

  Parameters split over the mesh along their largest evenly dividing
  dimension (:func:`fsdp_param_sharding`), the optimizer state placed by
  ``s4.state_sharding(..., params_sharding=)``: factors split over their
  bucket axis, Adam's moments like their parameters. Exact, from each
  leaf's shard shape (nothing is allocated). ``vs_even_split`` is the
  per-device bytes over ``total / N`` (1.0: a perfect split; the total
  counts the padding factors of this N).
  """
  params = MODELS[model]()
  rows = {}
  for n in device_counts:
    mesh = _mesh(n)
    param_shardings = jax.tree.map(lambda p, mesh=mesh: fsdp_param_sharding(mesh, p.shape), params)
    abstract = jax.eval_shape(_tx(mesh).init, params)
    state_shardings = s4.state_sharding(abstract, mesh, params_sharding=param_shardings)
    params_device, params_total = _per_device_and_total(params, param_shardings)
    state_device, state_total = _per_device_and_total(abstract, state_shardings)
    per_device, total = params_device + state_device, params_total + state_total
    rows[n] = {"params_per_device": params_device, "params_total": params_total,
               "opt_state_per_device": state_device, "opt_state_total": state_total,
               "train_state_per_device": per_device, "train_state_total": total,
               "vs_even_split": per_device / (total / n)}
  return {"model": model, "optimizer": "adamw_shampoo4 (4-bit, defaults)",
          "layout": "params split along their largest dimension divisible by N; Adam moments like them; "
                    "factors split over their bucket axis", "rows": rows}


def fsdp_gathers_table(model: str, n: int) -> dict:
  """The float all-gathers of the compiled FSDP ``tx.update`` (4-bit ``adamw_shampoo4``) on ``n`` devices.

  Parameters, gradients and the state laid out as in :func:`fsdp_memory_table`;
  the whole update is compiled (refresh branches included; minutes for
  GPT-2 on 2 cores) and its per-device all-gathers listed
  (``benchmarks/hlo_flops.py``): those of the factor arrays (the 4-bit roots'
  float32 diagonals and block scales, gathered for the preconditioning) and
  the others, whose largest per-device result is compared with the smallest
  preconditioned gradient: below 1 (or none) means no whole gradient is gathered.
  """
  params = MODELS[model]()
  mesh = _mesh(n)
  param_shardings = jax.tree.map(lambda p: fsdp_param_sharding(mesh, p.shape), params)
  tx = _tx(mesh)
  abstract = jax.eval_shape(tx.init, params)
  state_shardings = s4.state_sharding(abstract, mesh, params_sharding=param_shardings)
  params = _abstract_with(params, param_shardings)
  t0 = time.perf_counter()
  update = jax.jit(tx.update, out_shardings=(param_shardings, state_shardings))
  hlo = update.lower(params, _abstract_with(abstract, state_shardings), params).compile().as_text()
  gathers = [g for g in all_gathers(hlo) if g["dtype"].startswith(("f", "bf"))]
  factor_shapes = {tuple(leaf.shape) for st in jax.tree.leaves(abstract, is_leaf=_is_state) if _is_state(st)
                   for leaf in jax.tree.leaves(st.factors)}
  others = [g for g in gathers if tuple(g["shape"]) not in factor_shapes]
  smallest = min(int(np.prod(p.shape)) for p in jax.tree.leaves(params) if len(p.shape) >= 2)
  largest = max((g["elements"] for g in others), default=0)
  return {"model": model, "devices": n, "compile_s": time.perf_counter() - t0, "float_all_gathers": len(gathers),
          "of_factor_arrays": len(gathers) - len(others), "other_float_all_gathers": len(others),
          "largest_other_elements": largest, "smallest_gradient_elements": smallest,
          "largest_other_vs_smallest_gradient": largest / smallest,
          "all_to_alls": hlo.count(" all-to-all("), "shapes": sorted({str(g["shape"]) for g in gathers})}


def print_fsdp_memory(table: dict) -> None:
  print(f"\nFSDP train state per device (params + optimizer state), {table['model']}, {table['optimizer']}")
  print(f"{'N':>3s} {'params MiB/dev':>14s} {'opt state MiB/dev':>17s} {'total MiB/dev':>13s} "
        f"{'total/N MiB':>11s} {'vs total/N':>10s}")
  for n, r in table["rows"].items():
    print(f"{int(n):3d} {r['params_per_device'] / MIB:14.1f} {r['opt_state_per_device'] / MIB:17.1f} "
          f"{r['train_state_per_device'] / MIB:13.1f} {r['train_state_total'] / int(n) / MIB:11.1f} "
          f"{r['vs_even_split']:10.4f}")


# ----------------------------------------------------------------------------- every-step flops


def _shampoo_product(left, block, right):
  return linalg.matmul(linalg.matmul(left, block), right)


def _abstract_with(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _compiled_every_step(params, mesh, program: str):
  """The compiled program whose dots are counted, and the schedule it follows."""
  tx = s4.scale_by_shampoo4(mesh=mesh)
  abstract = jax.eval_shape(tx.init, params)
  if mesh is not None:
    abstract = _abstract_with(abstract, s4.state_sharding(abstract, mesh))
  factor_engine = engine.FactorEngine(fct.FactorConfig(), 1024, 64, mesh)
  plan = factor_engine.plan(params)
  if program == "update":
    return jax.jit(tx.update).lower(params, abstract).compile(), factor_engine.schedule(plan)
  roots = {name: bucket.root for name, bucket in abstract.factors.items()}

  def every_step(grads, roots):
    matrices = engine.matrix_views(jax.tree.leaves(grads), plan)
    return factor_engine.apply_blocks(plan, matrices, factor_engine.gathered(roots), _shampoo_product)

  return jax.jit(every_step).lower(params, roots).compile(), factor_engine.schedule(plan)


def flops_table(model: str, device_counts: list[int], program: str) -> dict:
  params = MODELS[model]()
  rows = {}
  for n in sorted(set([1] + device_counts)):
    print(f"  compiling the {program} program for N = {n}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    compiled, schedule = _compiled_every_step(params, _mesh(n) if n > 1 else None, program)
    compile_s = time.perf_counter() - t0
    counted = dot_flops(compiled.as_text())
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    rows[n] = {"dot_flops_per_device": counted["every_call"], "cost_analysis_flops": float(analysis["flops"]),
               "schedule_flops_per_device": 2 * schedule.shard_cost, "balance": schedule.balance,
               "groups": [[*g.shape, len(g.blocks), g.chunks, g.per_shard] for g in schedule.groups],
               "compile_s": compile_s}
  one = rows[1]["dot_flops_per_device"]
  for r in rows.values():
    r["vs_1_device"] = r["dot_flops_per_device"] / one
  return {"model": model, "program": program, "rows": {n: rows[n] for n in device_counts}}


def soap_flops_table(model: str, device_counts: list[int]) -> dict:
  """Per-device dot flops of ``scale_by_soap4``'s compiled update (defaults, ``mesh=``): a plain step (outside the
  refresh's conditional) and the refresh branch; and XLA's scratch (temporary) bytes per device."""
  params = MODELS[model]()
  rows = {}
  for n in sorted(set([1] + device_counts)):
    print(f"  compiling soap4's update for N = {n}", file=sys.stderr, flush=True)
    mesh = _mesh(n) if n > 1 else None
    tx = s4.scale_by_soap4(mesh=mesh)
    state = jax.eval_shape(tx.init, params)
    if mesh is not None:
      state = _abstract_with(state, s4.state_sharding(state, mesh))
    compiled = jax.jit(tx.update).lower(params, state, params).compile()
    counted = dot_flops(compiled.as_text())
    rows[n] = {"every_step_flops_per_device": counted["every_call"], "refresh_flops_per_device": counted["in_branches"],
               "temp_bytes_per_device": compiled.memory_analysis().temp_size_in_bytes}
  for r in rows.values():
    r["every_step_vs_1_device"] = r["every_step_flops_per_device"] / rows[1]["every_step_flops_per_device"]
  return {"model": model, "optimizer": "scale_by_soap4 (defaults)", "rows": {n: rows[n] for n in device_counts}}


def print_soap_flops(table: dict) -> None:
  print(f"\nsoap4's update per device, {table['model']}: plain-step and refresh-branch matrix-product flops")
  print(f"{'N':>3} {'step GFLOP':>11} {'vs 1 dev':>9} {'1/N':>7} {'refresh GFLOP':>14} {'scratch MiB':>12}")
  for n, r in table["rows"].items():
    print(f"{int(n):3d} {r['every_step_flops_per_device'] / 1e9:11.2f} {r['every_step_vs_1_device']:9.3f} "
          f"{1 / int(n):7.3f} {r['refresh_flops_per_device'] / 1e9:14.2f} {r['temp_bytes_per_device'] / 2**20:12.1f}")


def _compiled_statistics_step(params, mesh):
  """The compiled ``refresh_stats`` of ``params``' factors (abstract buckets split over ``mesh``)."""
  factor_engine = engine.FactorEngine(fct.FactorConfig(), 1024, 64, mesh)
  plan = factor_engine.plan(params)
  buckets = jax.eval_shape(lambda: factor_engine.init_buckets(plan, jax.numpy.float32(1e-6)))
  matrices = jax.eval_shape(lambda p: engine.matrix_views(jax.tree.leaves(p), plan), params)
  if mesh is not None:
    buckets = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P("data"))),
                           buckets)
    matrices = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())),
                            matrices)
  step = jax.jit(lambda b, m: factor_engine.refresh_stats(b, plan, m, jax.numpy.float32(0.9)))
  return step.lower(buckets, matrices).compile()


def stats_flops_table(model: str, device_counts: list[int]) -> dict:
  params = MODELS[model]()
  rows = {}
  for n in sorted(set([1] + device_counts)):
    print(f"  compiling the statistics step for N = {n}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    compiled = _compiled_statistics_step(params, _mesh(n) if n > 1 else None)
    rows[n] = {"dot_flops_per_device": dot_flops(compiled.as_text())["every_call"],
               "compile_s": time.perf_counter() - t0}
  one = rows[1]["dot_flops_per_device"]
  for r in rows.values():
    r["vs_1_device"] = r["dot_flops_per_device"] / one
  return {"model": model, "program": "refresh_stats (eigen, 4-bit, max order 1024)",
          "rows": {n: rows[n] for n in device_counts}}


def print_stats_flops(table: dict) -> None:
  print(f"\nStatistics step per device, {table['model']}, from the compiled {table['program']}")
  print(f"{'N':>3s} {'dot GFLOP/device':>16s} {'of N = 1':>8s} {'ideal 1/N':>9s}")
  for n, r in table["rows"].items():
    print(f"{int(n):3d} {r['dot_flops_per_device'] / 1e9:16.2f} {r['vs_1_device']:8.3f} {1 / int(n):9.3f}")


# ----------------------------------------------------------------------------- timing (child)


def _decoder_params():
  from benchmarks.speed import MODEL_SIZES, decoder_params

  return decoder_params(jax.random.key(0), **MODEL_SIZES["small"])


def time_one_device_count(n: int, steps: int, repeats: int) -> dict:
  """Runs in a child process: allocates the sharded state on ``n`` devices and times updates."""
  mesh = _mesh(n)
  params = jax.device_put(_decoder_params(), NamedSharding(mesh, P()))
  keys = jax.random.split(jax.random.key(1), 4)
  grads = [jax.tree.map(lambda p, k=k: 1e-2 * jax.random.normal(k, p.shape), params) for k in keys]
  grads = jax.device_put(grads, NamedSharding(mesh, P()))
  txs = {"refresh": _tx(mesh, 1, 1), "plain": _tx(mesh, 100, 500)}
  abstract = jax.eval_shape(txs["refresh"].init, params)
  shardings = s4.state_sharding(abstract, mesh)
  state = jax.block_until_ready(jax.jit(txs["refresh"].init, out_shardings=shardings)(params))
  replicated = NamedSharding(mesh, P())
  programs, compile_s = {}, {}
  for name, tx in txs.items():
    t0 = time.perf_counter()
    programs[name] = jax.jit(tx.update, out_shardings=(replicated, shardings)).lower(
        grads[0], state, params).compile()
    compile_s[name] = time.perf_counter() - t0
  for i in range(3):  # warm-up: full-rank statistics, non-trivial roots (counter 3)
    _, state = jax.block_until_ready(programs["refresh"](grads[i % 4], state, params))
  samples = {name: [] for name in programs}
  for r in range(repeats):
    for name in (list(programs) if r % 2 == 0 else list(programs)[::-1]):
      for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(programs[name](grads[3], state, params))
        samples[name].append(time.perf_counter() - t0)
  device0 = jax.devices()[0]
  allocated = {"factors": 0, "rest": 0}
  factor_ids = {id(x) for st in jax.tree.leaves(state, is_leaf=_is_state) if _is_state(st)
                for x in jax.tree.leaves(st.factors)}
  for leaf in jax.tree.leaves(state):
    on_device0 = sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device0)
    allocated["factors" if id(leaf) in factor_ids else "rest"] += on_device0
  exact = _split_bytes(abstract, shardings)
  return {
      "devices": n,
      "refresh_ms": float(np.median(samples["refresh"]) * 1e3),
      "plain_ms": float(np.median(samples["plain"]) * 1e3),
      "samples": {k: len(v) for k, v in samples.items()},
      "compile_s": compile_s,
      "allocated_factor_bytes_device0": allocated["factors"],
      "exact_factor_bytes_per_device": exact["factors_per_device"],
      "allocated_rest_bytes_device0": allocated["rest"],
  }


def time_table(device_counts: list[int], steps: int, repeats: int) -> dict:
  rows = {}
  for n in device_counts:
    print(f"  timing on {n} device(s) (subprocess)", file=sys.stderr, flush=True)
    result = subprocess.run(
        [sys.executable, __file__, "--child", str(n), "--steps", str(steps), "--repeats", str(repeats)],
        capture_output=True, text=True, timeout=1800, env=dict(os.environ))
    if result.returncode != 0:
      raise RuntimeError(f"child for {n} devices failed:\n{result.stderr[-3000:]}")
    rows[n] = json.loads(result.stdout.strip().splitlines()[-1])
  base = rows[device_counts[0]]
  for r in rows.values():
    r["refresh_vs_1_device"] = r["refresh_ms"] / base["refresh_ms"]
    r["plain_vs_1_device"] = r["plain_ms"] / base["plain_ms"]
  return {"model": "decoder 4 x 256 (benchmarks/speed.py 'small')", "rows": rows}


# ----------------------------------------------------------------------------- output


def print_flops(flops: dict) -> None:
  print(f"\nEvery-step L̂GR̂ per device, {flops['model']}, from the compiled {flops['program']} program")
  print(f"{'N':>3s} {'dot GFLOP/device':>16s} {'of N = 1':>8s} {'ideal 1/N':>9s} {'balance':>8s} "
        f"{'cost_analysis GFLOP':>19s}")
  for n, r in flops["rows"].items():
    print(f"{n:3d} {r['dot_flops_per_device'] / 1e9:16.2f} {r['vs_1_device']:8.3f} {1 / n:9.3f} "
          f"{r['balance']:8.3f} {r['cost_analysis_flops'] / 1e9:19.2f}")


def print_tables(memory: dict, timing: dict | None) -> None:
  print(f"\nPer-device optimizer state, adamw_shampoo4 (4-bit), {memory['model']} "
        f"({memory['params'] / 1e6:.0f}M params), factors split over N devices")
  print(f"{'N':>3s} {'factors/device MiB':>18s} {'of 1 device':>11s} {'ideal 1/N':>9s} "
        f"{'AdamW moments etc. MiB':>22s} {'total/device MiB':>16s}")
  for n, r in memory["rows"].items():
    print(f"{n:3d} {r['factors_per_device'] / MIB:18.2f} {r['factors_fraction_of_1_device']:11.3f} "
          f"{r['ideal_fraction']:9.3f} {r['rest_per_device'] / MIB:22.2f} "
          f"{(r['factors_per_device'] + r['rest_per_device']) / MIB:16.2f}")
  if timing is None:
    return
  print(f"\nUpdate time vs N, {timing['model']}, state sharded (median ms)")
  print(f"{'N':>3s} {'refresh step ms':>15s} {'vs N=1':>7s} {'plain step ms':>13s} {'vs N=1':>7s} "
        f"{'factor bytes dev0 (alloc = exact)':>34s}")
  for n, r in timing["rows"].items():
    same = "yes" if r["allocated_factor_bytes_device0"] == r["exact_factor_bytes_per_device"] else "NO"
    print(f"{n:3d} {r['refresh_ms']:15.1f} {r['refresh_vs_1_device']:6.2f}x {r['plain_ms']:13.2f} "
          f"{r['plain_vs_1_device']:6.2f}x {r['allocated_factor_bytes_device0'] / MIB:24.2f} MiB ({same})")


def plot(memory: dict, timing: dict | None, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2 if timing else 1, figsize=(11 if timing else 5.5, 4))
  axes = np.atleast_1d(axes)
  ns = list(memory["rows"])
  ax = axes[0]
  ax.plot(ns, [memory["rows"][n]["factors_per_device"] / MIB for n in ns], "o-", label="Shampoo factors")
  ax.plot(ns, [memory["rows"][ns[0]]["factors_per_device"] / MIB / (n / ns[0]) for n in ns], "k--",
          lw=0.8, label="ideal 1/N")
  ax.plot(ns, [memory["rows"][n]["rest_per_device"] / MIB for n in ns], "s-", label="rest (AdamW, replicated)")
  ax.set_xscale("log", base=2)
  ax.set_xticks(ns, [str(n) for n in ns])
  ax.set_xlabel("devices N")
  ax.set_ylabel("MiB per device")
  ax.set_title(f"4-bit state per device, {memory['model']}", fontsize=9)
  ax.legend(fontsize=8)
  if timing:
    ax = axes[1]
    tn = list(timing["rows"])
    ax.plot(tn, [timing["rows"][n]["refresh_ms"] for n in tn], "o-", label="refresh step (T1=T2=1)")
    ax.plot(tn, [timing["rows"][n]["plain_ms"] for n in tn], "s-", label="plain step")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(tn, [str(n) for n in tn])
    ax.set_xlabel("devices N")
    ax.set_ylabel("ms per update (median)")
    ax.set_title(f"{timing['model']}, {jax.devices()[0].platform}", fontsize=9)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> dict | None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
  parser.add_argument("--bytes-model", default="gpt2_124m", choices=list(MODELS))
  parser.add_argument("--steps", type=int, default=3, help="timed calls per program per round")
  parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
  parser.add_argument("--skip-timing", action="store_true")
  parser.add_argument("--flops-model", default="gpt2_124m", choices=list(MODELS))
  parser.add_argument("--flops-program", default="step", choices=["step", "update"])
  parser.add_argument("--skip-flops", action="store_true")
  parser.add_argument("--flops-only", action="store_true",
                      help="compute only the every-step flops table (exact, minutes) and add it to --out")
  parser.add_argument("--stats-flops-only", action="store_true",
                      help="compute only the statistics-step flops table and add it to --out")
  parser.add_argument("--soap-flops-only", action="store_true",
                      help="compute only soap4's per-device flops table (exact, minutes) and add it to --out")
  parser.add_argument("--fsdp-memory-only", action="store_true",
                      help="compute only the FSDP train-state table (exact, seconds) and add it to --out")
  parser.add_argument("--fsdp-gathers-only", action="store_true",
                      help="compile the FSDP update on the largest --devices and add its all-gathers to --out")
  parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed.json"))
  args = parser.parse_args(argv)
  if args.child is not None:
    print(json.dumps(time_one_device_count(args.child, args.steps, args.repeats)))
    return None
  if max(args.devices) > jax.device_count():
    parser.error(f"--devices {args.devices}: only {jax.device_count()} devices visible")

  if (args.flops_only or args.stats_flops_only or args.soap_flops_only or args.fsdp_memory_only
      or args.fsdp_gathers_only):
    out = pathlib.Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    if args.flops_only:
      result["flops"] = flops_table(args.flops_model, args.devices, args.flops_program)
      print_flops(result["flops"])
    if args.stats_flops_only:
      result["stats_flops"] = stats_flops_table(args.flops_model, args.devices)
      print_stats_flops(result["stats_flops"])
    if args.soap_flops_only:
      result["soap_flops"] = soap_flops_table(args.flops_model, args.devices)
      print_soap_flops(result["soap_flops"])
    if args.fsdp_memory_only:
      result["fsdp_memory"] = fsdp_memory_table(args.bytes_model, args.devices)
      print_fsdp_memory(result["fsdp_memory"])
    if args.fsdp_gathers_only:
      result["fsdp_gathers"] = fsdp_gathers_table(args.bytes_model, max(args.devices))
      print(json.dumps(result["fsdp_gathers"], indent=1))
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return result
  memory = bytes_table(args.bytes_model, args.devices)
  fsdp_memory = fsdp_memory_table(args.bytes_model, args.devices)
  flops = None if args.skip_flops else flops_table(args.flops_model, args.devices, args.flops_program)
  timing = None if args.skip_timing else time_table(args.devices, args.steps, args.repeats)
  print_tables(memory, timing)
  print_fsdp_memory(fsdp_memory)
  if flops is not None:
    print_flops(flops)
  stats_flops = None if args.skip_flops else stats_flops_table(args.flops_model, args.devices)
  if stats_flops is not None:
    print_stats_flops(stats_flops)
  result = {
      "memory": memory, "fsdp_memory": fsdp_memory, "timing": timing, "flops": flops, "stats_flops": stats_flops,
      "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                      "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
                      "cpu_count": os.cpu_count(), "machine": platform.machine(),
                      "loadavg": os.getloadavg()},
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2))
  plot(memory, timing, out.with_suffix(".png"))
  print(f"\nwrote {out} and {out.with_suffix('.png')}")
  return result


if __name__ == "__main__":
  main()
