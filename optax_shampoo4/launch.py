r"""Start several local JAX processes joined by ``jax.distributed.initialize`` (multi-host, on one host).

A program written for several hosts (one process per host, a mesh over
``jax.devices()`` of all processes, each process feeding its host-local batch
with ``jax.make_array_from_process_local_data``) runs unchanged on one machine
as ``N`` processes with ``K`` CPU devices each:

* :func:`launch` starts ``N`` copies of a command with the coordinator on
  ``127.0.0.1:<free port>`` (no other network traffic), ``K`` virtual CPU
  devices per process (``XLA_FLAGS=--xla_force_host_platform_device_count=K``)
  and a wall-clock timeout; if one process fails the others are stopped.
* :func:`initialize_from_env`, called by each process before it uses JAX,
  selects the ``gloo`` CPU collectives and joins the others.

Example (``examples/distributed.py --processes 2`` does this)::

  results = launch([sys.executable, "train.py"], num_processes=2, devices_per_process=2, timeout=300)
  # in train.py, first thing:
  from optax_shampoo4 import launch
  launch.initialize_from_env()   # no-op when not started by launch()
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import time
from typing import Sequence

COORDINATOR = "OPTAX_SHAMPOO4_COORDINATOR"
NUM_PROCESSES = "OPTAX_SHAMPOO4_NUM_PROCESSES"
PROCESS_ID = "OPTAX_SHAMPOO4_PROCESS_ID"


@dataclasses.dataclass
class ProcessResult:
  """One launched process: its id, exit code (None if it was stopped), stdout and stderr."""

  process_id: int
  returncode: int | None
  stdout: str
  stderr: str


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, devices_per_process: int, port: int,
                base: dict | None = None) -> dict:
  """The environment of process ``process_id`` (see :func:`launch`)."""
  env = dict(os.environ if base is None else base)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
  env["JAX_PLATFORMS"] = "cpu"
  env[COORDINATOR] = f"127.0.0.1:{port}"
  env[NUM_PROCESSES] = str(num_processes)
  env[PROCESS_ID] = str(process_id)
  return env


def start(command: Sequence[str], num_processes: int, devices_per_process: int, *, env: dict | None = None,
          cwd: str | None = None) -> list[subprocess.Popen]:
  """Starts the processes (see :func:`launch`) and returns them at once."""
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(f"num_processes and devices_per_process must be >= 1, got "
                     f"num_processes={num_processes}, devices_per_process={devices_per_process}")
  port = free_port()
  return [subprocess.Popen(list(command), env=process_env(i, num_processes, devices_per_process, port, env),
                           cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(num_processes)]


def wait(processes: list[subprocess.Popen], timeout: float, grace: float = 30.0) -> list[ProcessResult]:
  """Waits for ``processes``; stops them all at ``timeout`` s, or ``grace`` s after one fails."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and any(p.poll() is None for p in processes):
    if any(p.poll() not in (None, 0) for p in processes):
      deadline = min(deadline, time.monotonic() + grace)
    time.sleep(0.2)
  results = []
  for i, p in enumerate(processes):
    stopped = p.poll() is None
    if stopped:
      p.kill()
    out, err = p.communicate(timeout=60)
    results.append(ProcessResult(i, None if stopped else p.returncode, out, err))
  return results


def launch(command: Sequence[str], num_processes: int, devices_per_process: int, *, timeout: float,
           env: dict | None = None, cwd: str | None = None) -> list[ProcessResult]:
  """Runs ``num_processes`` copies of ``command`` as one JAX program; returns when all have ended.

  Each process gets ``devices_per_process`` CPU devices, the coordinator
  address ``127.0.0.1:<free port>`` and its process id in its environment;
  it must call :func:`initialize_from_env` before using JAX.

  Args:
    command: the program and its arguments (e.g. ``[sys.executable, "train.py"]``).
    num_processes: how many processes.
    devices_per_process: CPU devices per process.
    timeout: seconds after which every process still running is killed.
    env: base environment (default: this process's).
    cwd: working directory of the processes.

  Returns:
    One :class:`ProcessResult` per process, in process-id order
    (``returncode`` None for a process killed at the timeout).
  """
  return wait(start(command, num_processes, devices_per_process, env=env, cwd=cwd), timeout)


def initialize_from_env(timeout_s: int = 120) -> bool:
  """Joins the processes started by :func:`launch` (gloo CPU collectives); False if not launched by it.

  Must run before anything initializes a JAX backend.
  """
  if COORDINATOR not in os.environ:
    return False
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=os.environ[COORDINATOR],
                             num_processes=int(os.environ[NUM_PROCESSES]),
                             process_id=int(os.environ[PROCESS_ID]),
                             initialization_timeout=timeout_s)
  return True
