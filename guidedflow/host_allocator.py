"""Keep freed host memory in the process, so that XLA:CPU's temporaries cost no page faults.

XLA:CPU allocates an executable's temporaries (every activation of a train step: 3.9 GB for
DiT-S/2 at batch 32) as one buffer when it runs, and frees it at the end. glibc serves a block
that large with a fresh `mmap` and returns it with `munmap`, so every step the kernel faults
in and zeroes every page again: ~960k page faults per DiT-S/2 step. Arrays over 32 MB ran at
half the speed of smaller ones, in PyTorch too (a (8192, 384) × (384, 1536) matmul at
235 GFLOP/s against 360 at 4096 rows; benchmarks/README.md).

`keep_freed_memory` has glibc keep what is freed (`mallopt`: no `mmap` for large blocks,
`M_MMAP_MAX` 0; the heap never trimmed, `M_TRIM_THRESHOLD` max) and has JAX run CPU
computations in the calling thread (`jax_cpu_enable_async_dispatch` off). Both are needed:
glibc honours `M_MMAP_MAX` only in its main arena, the one the main thread allocates from,
while a thread of its own (JAX's asynchronous dispatch) maps large blocks whatever the setting.
(One arena for every thread, `M_ARENA_MAX` 1, did the same but slowed compiles 1.4× and small
samplers 1.3× on lock contention.) Measured on the 2-core Xeon: W1 f32 train +8 %, CFG
sampling +23 %, W2 bf16 train +18 %, page faults per DiT-S/2 step ~960k → ~0.

It must run before JAX's first operation (the CPU client reads the dispatch setting when it
starts): `python -m guidedflow.main` and the benchmarks call it first. It applies to CPU-only
hosts (a GPU or TPU keeps its activations in device memory) on Linux with glibc; elsewhere, or
with `GUIDEDFLOW_HOST_ALLOCATOR=system`, it changes nothing. The costs: the process's resident
memory stays at its peak instead of shrinking between steps, and a CPU step no longer overlaps
the Python work of the next (the input pipeline prefetches in its own thread).
"""

import ctypes
import importlib.util
import os
import sys

from guidedflow import jax_compat

ENV = 'GUIDEDFLOW_HOST_ALLOCATOR'  # 'keep' (default) or 'system'
# glibc's mallopt parameters (malloc.h): no mmap for large blocks; never trim (-1: SIZE_MAX).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_SETTINGS = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))


def gpu_plugin_installed():
  return any(importlib.util.find_spec(p) for p in ('jax_cuda12_plugin', 'jax_cuda13_plugin'))


def tpu_chips():
  """The number of TPU chips on this host's PCI bus; None where JAX cannot tell."""
  return jax_compat.tpu_chips()


def skip_tpu_probe_without_tpu():
  """libtpu installed (for --mode=compile) on a machine without a TPU chip or GPU plugin: JAX
  would probe for a TPU at start-up and libtpu print its errors on every run. Use the CPU
  unless JAX_PLATFORMS says otherwise; compiles for TPU topologies still work."""
  if os.environ.get('JAX_PLATFORMS') or importlib.util.find_spec('libtpu') is None:
    return
  if not gpu_plugin_installed() and tpu_chips() == 0:
    import jax  # pylint: disable=g-import-not-at-top  # importing starts no backend
    jax.config.update('jax_platforms', 'cpu')


def _cpu_only():
  """Whether JAX will run on the host CPU alone (told so, or no GPU plugin and no TPU chip)."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if 'jax' in sys.modules:
    platforms = sys.modules['jax'].config.jax_platforms or platforms
  if platforms:
    return platforms.split(',')[0] == 'cpu'
  if gpu_plugin_installed():
    return False
  return importlib.util.find_spec('libtpu') is None or tpu_chips() == 0


def keep_freed_memory():
  """Sets glibc to keep freed memory (module docstring); returns what it did, in words."""
  choice = os.environ.get(ENV, 'keep')
  if choice not in ('keep', 'system'):
    raise ValueError(f'{ENV}={choice!r}: use keep or system')
  if choice == 'system':
    return f'host allocator: the system default ({ENV}=system)'
  if not _cpu_only():
    return 'host allocator: the system default (an accelerator holds the activations)'
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    version = libc.gnu_get_libc_version().decode()
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return 'host allocator: the system default (not glibc)'
  if not all(mallopt(param, value) == 1 for param, value in _SETTINGS):
    return f'host allocator: glibc {version} refused the settings; the system default'
  import jax  # pylint: disable=g-import-not-at-top  # importing starts no backend
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  return (f'host allocator: glibc {version} keeps freed memory (no mmap, no trim; CPU '
          f'computations run in the main thread; {ENV}=system to undo)')
