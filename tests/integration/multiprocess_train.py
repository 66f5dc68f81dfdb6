"""One process of a multi-process training run (started by ``optax_shampoo4.launch``; see test_multiprocess.py).

Trains a small ``TransformerLM`` of ``examples/transformer_lm.py`` with
``adamw_shampoo4(mesh=...)`` on a mesh over every device of every process
(explicit or auto axis types). Each process feeds its own rows of the global
batch (``jax.make_array_from_process_local_data``); the global batch of step
``t`` is the same whatever the number of processes. Optionally restores an
orbax checkpoint first, saves one every ``--save-every`` steps, and process 0
writes the final parameters and the losses to ``--out`` (``.npz``).
"""

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from optax_shampoo4 import launch  # noqa: E402

launch.initialize_from_env()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import transformer_lm  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_shampoo4 as s4  # noqa: E402

CONTEXT, BATCH = 16, 8


def parse_args():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=24)
  parser.add_argument("--start", type=int, default=0, help="first step (after --restore)")
  parser.add_argument("--restore", default=None, help="checkpoint directory to resume from")
  parser.add_argument("--save-every", type=int, default=0)
  parser.add_argument("--save-dir", default=None)
  parser.add_argument("--mesh-kind", choices=("explicit", "auto"), default="auto")
  parser.add_argument("--out", default=None)
  return parser.parse_args()


def global_batches(steps: int) -> np.ndarray:
  """``int32[steps, BATCH, CONTEXT + 1]``: the same windows of the corpus in every process."""
  corpus = transformer_lm.load_corpus()
  starts = np.random.default_rng(0).integers(0, len(corpus) - CONTEXT - 1, size=(steps, BATCH))
  return transformer_lm.windows(corpus, starts.reshape(-1), CONTEXT + 1).reshape(steps, BATCH, CONTEXT + 1)


def main():
  args = parse_args()
  kind = {"explicit": jax.sharding.AxisType.Explicit, "auto": jax.sharding.AxisType.Auto}[args.mesh_kind]
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(kind,))
  replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  model = transformer_lm.TransformerLM(nnx.Rngs(0), context=CONTEXT, d_model=32, num_heads=2, d_mlp=64,
                                       num_layers=1)
  graphdef, params = nnx.split(model)
  params = jax.device_put(params, replicated)
  tx = s4.adamw_shampoo4(3e-3, weight_decay=1e-2, mesh=mesh, stats_every=4, root_every=8, state_format="naive",
                         min_quant_order=32)
  state_shardings = s4.state_sharding(jax.eval_shape(tx.init, params), mesh)
  opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  if args.restore:
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          {"params": params, "opt_state": opt_state})
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(pathlib.Path(args.restore).resolve(), target)
    params, opt_state = restored["params"], restored["opt_state"]

  def loss_fn(params, tokens):
    return transformer_lm.next_byte_loss(nnx.merge(graphdef, params), tokens)

  loss_and_grads = jax.value_and_grad(loss_fn)
  if args.mesh_kind == "explicit":
    # The model's embedding lookups (nnx.Embed: a gather) do not declare an output layout, which explicit
    # sharding requires; the forward and backward pass run with the mesh's axes made automatic, the optimizer
    # takes explicitly sharded (replicated) gradients.
    loss_and_grads = jax.sharding.auto_axes(loss_and_grads, out_sharding=(P(), jax.tree.map(lambda _: P(), params)))
  jax.set_mesh(mesh)  # the mesh auto_axes and the jitted step see

  def step(params, opt_state, tokens):
    loss, grads = loss_and_grads(params, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  train_step = jax.jit(step, out_shardings=(replicated, state_shardings, replicated))
  batches = global_batches(args.steps)
  local = BATCH // jax.process_count()
  first = jax.process_index() * local
  losses = []
  for t in range(args.start, args.steps):
    tokens = jax.make_array_from_process_local_data(rows, batches[t, first:first + local])
    params, opt_state, loss = train_step(params, opt_state, tokens)
    losses.append(float(loss))
    print(f"step {t + 1} loss {losses[-1]:.6f}", flush=True)
    if args.save_every and (t + 1) % args.save_every == 0:
      with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(pathlib.Path(args.save_dir).resolve() / f"step_{t + 1}",
                          {"params": params, "opt_state": opt_state})
  if args.out and jax.process_index() == 0:
    flat = {jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(args.out, losses=np.asarray(losses), **flat)
  print("done", flush=True)


if __name__ == "__main__":
  main()
