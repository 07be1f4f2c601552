"""Backend selection: set_backend / use_backend / PYADAPT_BACKEND / available_backends, the
registry behind every custom op, and build_info. Choice order: use_backend > set_backend >
PYADAPT_BACKEND > auto; asking for an unknown or unavailable backend is a ValueError."""

import pytest
import torch

import pyadapt
from pyadapt import ops


@pytest.fixture(autouse=True)
def _restore_backend(monkeypatch):
    monkeypatch.delenv("PYADAPT_BACKEND", raising=False)
    yield
    pyadapt.set_backend("auto")


def test_reference_is_always_available():
    assert "reference" in pyadapt.available_backends(), "reference backend missing"


def test_every_custom_op_is_registered_with_torch_and_has_a_reference_kernel():
    table = ops.kernel_table()
    for name in ops.CUSTOM_OPS:
        assert hasattr(torch.ops.pyadapt, name), f"torch.ops.pyadapt.{name} is not declared"
        assert "reference" in table[name], f"{name} has no reference kernel"


def test_set_backend_and_auto():
    pyadapt.set_backend("reference")
    assert pyadapt.current_backend() == "reference", "set_backend did not take effect"
    pyadapt.set_backend("auto")
    assert pyadapt.current_backend() == "auto", "set_backend('auto') did not restore the default"


@pytest.mark.parametrize("name", ["nonsense", "", "TRITON"])
def test_unknown_backend_is_a_value_error_naming_the_argument(name):
    with pytest.raises(ValueError, match="backend"):
        pyadapt.set_backend(name)
    with pytest.raises(ValueError, match="backend"):
        with pyadapt.use_backend(name):
            pass


def test_unavailable_backend_is_a_clear_error():
    missing = [b for b in ("triton", "cuda", "cpu") if b not in pyadapt.available_backends()]
    assert missing, "test needs a backend that is not available in this build"
    with pytest.raises(ValueError, match="not available"):
        pyadapt.set_backend(missing[0])


def test_use_backend_nests_and_restores_after_an_exception():
    pyadapt.set_backend("auto")
    with pytest.raises(RuntimeError):
        with pyadapt.use_backend("reference"):
            assert pyadapt.current_backend() == "reference", "use_backend not in force"
            raise RuntimeError("boom")
    assert pyadapt.current_backend() == "auto", "use_backend did not restore after an exception"


def test_environment_variable_selects_the_backend(monkeypatch):
    monkeypatch.setenv("PYADAPT_BACKEND", "reference")
    assert pyadapt.current_backend() == "reference", "PYADAPT_BACKEND ignored"
    monkeypatch.setenv("PYADAPT_BACKEND", "bogus")
    adapter = pyadapt.FusedAdapter(8, 2)
    with pytest.raises(ValueError, match="PYADAPT_BACKEND"):
        adapter(torch.randn(3, 8))


def test_auto_resolves_every_op_on_cpu():
    for name in ops.CUSTOM_OPS:
        assert ops.backend_for(name, "cpu") in pyadapt.available_backends(), (
            f"auto picked an unavailable backend for {name}")


def test_reference_results_equal_default_results():
    adapter = pyadapt.FusedAdapter(16, 4, init="bert")
    x = torch.randn(5, 16)
    with pyadapt.use_backend("reference"):
        ref = adapter(x)
    assert torch.equal(adapter(x), ref), "auto and reference disagree on CPU"


def test_build_info_reports_backends_and_versions():
    info = pyadapt.build_info()
    assert info["backends"] == pyadapt.available_backends(), "build_info backends differ"
    assert info["torch"] == torch.__version__, "build_info torch version wrong"
    assert set(ops.CUSTOM_OPS) <= set(info["ops"]), "build_info misses ops"


def test_backward_runs_on_the_backend_its_forward_saw(monkeypatch):
    """Autograd runs CUDA backwards on its own threads, outside the caller's thread-local
    use_backend: the backward must follow the choice recorded at forward time. Simulated on CPU
    by running backward() in another thread, after the use_backend block has closed."""
    import threading

    from pyadapt.ops import _registry

    seen = []
    impls = _registry._kernels["bottleneck_backward"]
    for name, fn in list(impls.items()):
        def spy(*args, _name=name, _fn=fn, **kwargs):
            seen.append(_name)
            return _fn(*args, **kwargs)
        monkeypatch.setitem(impls, name, spy)
    adapter = pyadapt.FusedAdapter(24, 4).double()
    x = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    with pyadapt.use_backend("reference"):
        y = adapter(x)
    worker = threading.Thread(target=lambda: y.square().sum().backward())
    worker.start()
    worker.join()
    assert seen == ["reference"], f"backward ran on {seen}, forward used 'reference'"
    assert x.grad is not None and torch.isfinite(x.grad).all(), "backward did not complete"
