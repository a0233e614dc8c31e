"""Suite-wide hygiene and speed.

- One pytest process runs many modules, so each module's compiled programs (interpret-mode
  kernels and whole decoding loops among them) are released when it ends.
- XLA's compilations persist on disk for the session (JAX's compilation cache in one temporary
  folder, made by the first pytest process; xdist's workers and the subprocesses tests start
  inherit it through the environment): a program that another module, worker or subprocess
  compiled already is read back instead of being compiled again. On the 2-core CI machine
  compilation is most of the suite's time. JAX writes entries without a lock; a torn read would
  be a warning and a recompilation, not an error.
"""

import atexit
import gc
import os
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix="mage-jax-test-xla-cache-")
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
  # Environment variables, not jax.config: subprocesses that tests start share the folder.
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE_DIR,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")

import jax  # pylint: disable=g-import-not-at-top  (reads the variables above)
import pytest  # pylint: disable=g-import-not-at-top


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  yield
  jax.clear_caches()
  gc.collect()
