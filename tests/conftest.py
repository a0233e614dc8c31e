"""Suite-wide hygiene: one pytest process runs every module, so each module's compiled programs
(interpret-mode kernels and whole decoding loops among them) are released when it ends."""

import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  yield
  jax.clear_caches()
  gc.collect()
