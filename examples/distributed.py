"""Data-parallel training with 4-bit Shampoo, its factors split over the devices.

Trains a Flax NNX MLP (64 -> 256 -> 256 -> 256 -> 10) on scikit-learn's 8x8
handwritten digits (shipped with scikit-learn, no download) with
``s4.adamw_shampoo4`` on every visible device (or the first ``--devices``):

* one mesh axis, ``"data"``, over the devices;
* each minibatch is split over ``"data"`` (``NamedSharding(mesh, P("data"))``);
  the parameters and Adam's moments are replicated, so XLA all-reduces the
  gradients;
* the Shampoo factors are split over ``"data"``: the transform is built with
  ``mesh=mesh`` (every bucket's factor axis is padded to a multiple of the
  device count and the refreshes run under ``jax.shard_map``, each device on
  its own factors), and the state is placed with ``s4.state_sharding``;
* the train step is jitted with ``out_shardings`` equal to the input
  shardings, so the state keeps its layout from step to step.

It prints the loss every ``--log-every`` steps, the optimizer-state bytes held
by one device against the whole state, and the final losses and test accuracy.
On a CPU-only machine, ask XLA for 8 virtual devices (they share the real cores,
so this shows the layout, not a speed-up); on a multi-GPU host it runs unchanged
on the GPUs:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/distributed.py
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/distributed.py --devices 4 --steps 100

The mesh comes from ``jax.make_mesh``: explicit axis types by default (JAX's
own default), ``--mesh-kind auto`` for an ``AxisType.Auto`` mesh. Several
hosts are several processes joined by ``jax.distributed.initialize``; on one
machine ``--processes N`` starts N local processes (``optax_shampoo4.launch``:
coordinator on 127.0.0.1, gloo CPU collectives, ``--devices-per-process``
virtual CPU devices each), and every process feeds its own rows of each
global batch (``jax.make_array_from_process_local_data``):

  python examples/distributed.py --processes 2 --devices-per-process 2 --steps 100
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

try:
  import optax_shampoo4 as s4
except ModuleNotFoundError:  # Running from a source checkout without `pip install -e .`.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  import optax_shampoo4 as s4
from optax_shampoo4 import launch

# Refresh the statistics every T1 steps and the inverse roots every T2 steps:
# often, as this run is short (see examples/quickstart.py).
STATS_EVERY = 10  # T1
ROOT_EVERY = 20  # T2
EPSILON = 1e-4
MIN_QUANT_ORDER = 64  # the order-256 and order-64 factors are 4-bit, order 10 stays float32


class MLP(nnx.Module):
  """A 64 -> 256 -> 256 -> 256 -> 10 multilayer perceptron with ReLU activations."""

  def __init__(self, rngs: nnx.Rngs, hidden: int = 256):
    self.hidden1 = nnx.Linear(64, hidden, rngs=rngs)
    self.hidden2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.hidden3 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.output = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.hidden1(x))
    x = nnx.relu(self.hidden2(x))
    x = nnx.relu(self.hidden3(x))
    return self.output(x)


def load_standardized_digits(seed: int = 0):
  """The digits as float32 ``(x_train, y_train, x_test, y_test)``, standardized."""
  x, y = load_digits(return_X_y=True)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=0.25, random_state=seed, stratify=y)
  mean, std = x_train.mean(axis=0), x_train.std(axis=0)
  std[std == 0] = 1.0
  x_train, x_test = ((a - mean) / std for a in (x_train, x_test))
  return (x_train.astype(np.float32), y_train.astype(np.int32),
          x_test.astype(np.float32), y_test.astype(np.int32))


def bytes_on_device(tree, device) -> int:
  """Bytes of the shards of ``tree``'s arrays that live on ``device``."""
  return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree)
             for shard in leaf.addressable_shards if shard.device == device)


def bytes_total(tree) -> int:
  """Bytes of ``tree``'s arrays as global (logical) arrays."""
  return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def shampoo_factors(opt_state):
  """The Shampoo factor buckets inside an optimizer state."""
  states = [node for node in jax.tree.leaves(
      opt_state, is_leaf=lambda n: isinstance(n, s4.ScaleByShampoo4State))
      if isinstance(node, s4.ScaleByShampoo4State)]
  return [state.factors for state in states]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
  parser.add_argument("--seed", type=int, default=0, help="model init and minibatch order")
  parser.add_argument("--devices", type=int, default=None,
                      help="use the first N devices (default: all of jax.devices())")
  parser.add_argument("--batch-size", type=int, default=128,
                      help="global batch size, a multiple of the device count")
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--weight-decay", type=float, default=1e-4)
  parser.add_argument("--log-every", type=int, default=25, help="print the loss every N steps")
  parser.add_argument("--mesh-kind", choices=("explicit", "auto"), default="explicit",
                      help="axis types of the mesh (jax.make_mesh's default: explicit)")
  parser.add_argument("--processes", type=int, default=None,
                      help="start this many local processes joined by jax.distributed (see the module doc)")
  parser.add_argument("--devices-per-process", type=int, default=2, help="CPU devices per process (--processes)")
  parser.add_argument("--timeout", type=float, default=1800, help="seconds before --processes runs are stopped")
  return parser.parse_args(argv)


def run_processes(args: argparse.Namespace, argv: list[str]) -> dict:
  """Starts ``args.processes`` copies of this script (without ``--processes``); prints process 0's output."""
  skip = {"--processes", "--devices-per-process", "--timeout"}
  rest = [a for i, a in enumerate(argv) if a not in skip and (i == 0 or argv[i - 1] not in skip)]
  results = launch.launch([sys.executable, str(pathlib.Path(__file__).resolve()), *rest], args.processes,
                          args.devices_per_process, timeout=args.timeout)
  print(results[0].stdout, end="")
  for r in results:
    if r.returncode != 0:
      raise RuntimeError(f"process {r.process_id} ended with {r.returncode}:\n{r.stderr[-3000:]}")
  return {"processes": args.processes, "stdout": results[0].stdout}


def main(argv: list[str] | None = None) -> dict:
  """Trains; returns the losses, device count, state bytes and final metrics."""
  args = parse_args(argv)
  if args.processes is not None:
    return run_processes(args, sys.argv[1:] if argv is None else list(argv))
  launch.initialize_from_env()  # joins the other processes when started by --processes
  devices = jax.devices()
  num_devices = len(devices) if args.devices is None else args.devices
  if not 1 <= num_devices <= len(devices):
    raise ValueError(f"--devices must be in [1, {len(devices)}], got {num_devices}")
  if args.batch_size % num_devices:
    raise ValueError(f"--batch-size ({args.batch_size}) must be a multiple of the device "
                     f"count ({num_devices})")
  devices = devices[:num_devices]
  axis_type = {"explicit": jax.sharding.AxisType.Explicit, "auto": jax.sharding.AxisType.Auto}[args.mesh_kind]
  mesh = jax.make_mesh((num_devices,), ("data",), axis_types=(axis_type,), devices=devices)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))  # examples split over the devices

  x_train, y_train, x_test, y_test = load_standardized_digits()
  print(f"{num_devices} x {devices[0].platform} devices; digits: {len(x_train)} train / "
        f"{len(x_test)} test examples; MLP 64-256-256-256-10; {args.steps} steps of global "
        f"batch {args.batch_size} ({args.batch_size // num_devices} per device); "
        f"Shampoo T1={STATS_EVERY}, T2={ROOT_EVERY}")

  model = MLP(nnx.Rngs(args.seed))
  graphdef, params = nnx.split(model)
  params = jax.block_until_ready(jax.device_put(params, replicated))

  shampoo = dict(stats_every=STATS_EVERY, root_every=ROOT_EVERY, epsilon=EPSILON,
                 min_quant_order=MIN_QUANT_ORDER)
  tx = s4.adamw_shampoo4(args.lr, weight_decay=args.weight_decay, mesh=mesh, **shampoo)
  state_shardings = s4.state_sharding(jax.eval_shape(tx.init, params), mesh)
  opt_state = jax.block_until_ready(jax.jit(tx.init, out_shardings=state_shardings)(params))

  def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def evaluate(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, axis=-1) == y)

  # out_shardings = the input layout: parameters replicated, factors split.
  # donate_argnums lets XLA update params and state in place.
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  train_step = jax.jit(step, out_shardings=(replicated, state_shardings, replicated),
                       donate_argnums=(0, 1))

  def report_bytes(opt_state, when: str) -> dict[str, int]:
    factors = shampoo_factors(opt_state)
    device = jax.local_devices()[0]
    sizes = {"per_device": bytes_on_device(opt_state, device), "total": bytes_total(opt_state),
             "factors_per_device": bytes_on_device(factors, device),
             "factors_total": bytes_total(factors)}
    print(f"per-device optimizer state ({when}): {sizes['per_device']:,} of {sizes['total']:,} "
          f"bytes on {device} (Shampoo factors {sizes['factors_per_device']:,} of "
          f"{sizes['factors_total']:,}; Adam moments and counters replicated)")
    return sizes

  rng = np.random.default_rng(args.seed)
  order = np.concatenate([rng.permutation(len(x_train))
                          for _ in range(-(-args.steps * args.batch_size // len(x_train)))])
  batches = order[:args.steps * args.batch_size].reshape(args.steps, args.batch_size)

  before = report_bytes(opt_state, "at init")
  unsharded = s4.state_nbytes(jax.eval_shape(
      s4.adamw_shampoo4(args.lr, weight_decay=args.weight_decay, **shampoo).init, params))["total"]
  print(f"the same state on one device, unpadded: {unsharded:,} bytes")

  start = time.perf_counter()
  losses = []
  for i, index in enumerate(batches, start=1):
    # This process's rows of the global batch (all of them with one process).
    local = args.batch_size // jax.process_count()
    rows = index[jax.process_index() * local:(jax.process_index() + 1) * local]
    x = jax.make_array_from_process_local_data(batch_sharding, x_train[rows])
    y = jax.make_array_from_process_local_data(batch_sharding, y_train[rows])
    params, opt_state, loss = train_step(params, opt_state, x, y)
    losses.append(loss)
    if i % args.log_every == 0 or i == args.steps:
      print(f"step {i:4d}  loss {float(loss):.4f}")
  losses = [float(loss) for loss in jax.device_get(losses)]
  wall_time = time.perf_counter() - start
  after = report_bytes(opt_state, f"after {args.steps} steps")

  train_loss, _ = evaluate(params, jax.device_put(x_train, replicated),
                           jax.device_put(y_train, replicated))
  test_loss, test_accuracy = evaluate(params, jax.device_put(x_test, replicated),
                                      jax.device_put(y_test, replicated))
  train_loss, test_loss, test_accuracy = (float(v) for v in (train_loss, test_loss, test_accuracy))
  print(f"final: train loss {train_loss:.4f}, test loss {test_loss:.4f}, test accuracy "
        f"{100 * test_accuracy:.2f}%; {wall_time:.1f} s of training (compilation included)")
  return {
      "losses": losses,
      "devices": num_devices,
      "state_bytes_per_device": before["per_device"],
      "state_bytes_total": before["total"],
      "factor_bytes_per_device": before["factors_per_device"],
      "factor_bytes_total": before["factors_total"],
      "state_bytes_after": after,
      "state_bytes_unsharded": unsharded,
      "final_train_loss": train_loss,
      "test_loss": test_loss,
      "test_accuracy": test_accuracy,
      "wall_time_s": wall_time,
  }


if __name__ == "__main__":
  main()
