"""The one place guidedflow reads JAX's private state (`jax._src`), each read defensive.

Checked on jax 0.10.2 (Python 3.11) and jax 0.12.0 / 0.12.1 (Python 3.12, 3.13). Each function
answers a question public JAX cannot, and says "don't know" (False / None) when the private
module or attribute moved, so that a newer JAX degrades to the public code path, never fails.
The imports are inside the functions: `host_allocator` calls `tpu_chips` before anything else
may import JAX's backends, and a missing private module must not break importing guidedflow.
"""


def running_in_cloud_tpu_vm() -> bool:
  """JAX's own detection of a Cloud TPU VM with libtpu (`jax._src.clusters.cloud_tpu_cluster`)."""
  try:
    from jax._src.clusters import cloud_tpu_cluster  # pylint: disable=g-import-not-at-top
    return bool(cloud_tpu_cluster.running_in_cloud_tpu_vm)
  except (ImportError, AttributeError):
    return False


def preemption_service_active() -> bool:
  """Whether `jax.distributed` runs its preemption sync manager (`jax._src.distributed`)."""
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    state = distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None
  except (ImportError, AttributeError):
    return False


def tpu_chips():
  """The number of TPU chips on this host's PCI bus (`jax._src.hardware_utils`); None where it
  cannot tell."""
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
  except (ImportError, AttributeError, OSError):
    return None
  return chips
