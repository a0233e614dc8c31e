"""The kernel setting: resolution per backend, and the scope the library reads."""

import pytest

from pallas_kernels import dispatch


@pytest.mark.parametrize("setting,backend,resolved", [
    ("auto", "gpu", "pallas"), ("auto", "cpu", "xla"), ("auto", "tpu", "mosaic"),
    ("mosaic_interpret", "cpu", "mosaic_interpret"), ("interpret", "gpu", "interpret"), ("reference", "gpu", "reference"), ("xla", "gpu", "xla")])
def test_resolve_impl_per_backend(setting, backend, resolved):
  assert dispatch.resolve_impl(setting, backend) == resolved


def test_scope_sets_the_resolved_setting_and_restores_it():
  outside = dispatch.active_impl()
  with dispatch.use_kernels("reference") as resolved:
    with dispatch.use_kernels("interpret"):
      assert dispatch.active_impl() == "interpret"
    assert resolved == dispatch.active_impl() == "reference"
  assert dispatch.active_impl() == outside == dispatch.resolve_impl("auto")
  with pytest.raises(ValueError, match="impl must be one of"):
    dispatch.use_kernels("triton").__enter__()
