"""The --mesh and multi-host flags shared by the eval and train CLIs (CLI code: kept out of the
mage_jax library, which defines no flags).

Defined here once so both CLIs spell and document them the same way; ``setup`` turns them into
a mesh at the start of a CLI's main, before anything touches a device (the multi-host join must
come first). docs/sharding.md describes both.
"""

from __future__ import annotations

from absl import flags

MESH = flags.DEFINE_string(
    "mesh", None, "Device mesh, e.g. data:2,model:4 (batch over data, heads over model; "
    "see docs/sharding.md). Default: one device, no sharding.")
COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: host:port of process 0 (else "
    "$MAGE_COORDINATOR_ADDRESS). Every process runs the same command.")
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Multi-host: number of processes (else $MAGE_NUM_PROCESSES).")
PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Multi-host: this process's index (else $MAGE_PROCESS_ID).")


def setup():
  """Joins a multi-host run when the flags or environment ask for one, then returns the
  --mesh mesh over all devices of all processes (None without the flag).

  Raises:
    ValueError: a malformed --mesh, a mesh that does not match the device count, or an
      incomplete multi-host configuration (one line each).
  """
  from mage_jax import sharding  # pylint: disable=g-import-not-at-top

  sharding.initialize_distributed(COORDINATOR_ADDRESS.value, NUM_PROCESSES.value,
                                  PROCESS_ID.value)
  return sharding.mesh_from_flag(MESH.value)
