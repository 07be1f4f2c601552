"""Shared test helpers: relative errors and per-dtype tolerances (DESIGN.md section 5)."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

# Triton runs on the CPU interpreter where there is no GPU. Must be set before any @triton.jit
# function is defined, i.e. before pyadapt is imported; an explicit TRITON_INTERPRET wins.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

# ||out - ref|| / ||ref|| limits against the float64 reference.
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
LOW_PRECISION = (torch.bfloat16, torch.float16)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of out against ref (both upcast to float64)."""
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    if denom == 0.0:
        return diff
    return diff / denom


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str,
                     baseline: torch.Tensor | None = None) -> None:
    """out (computed in `dtype`) against the float64 ref. For bf16/fp16, when `baseline` (plain
    eager PyTorch in the same dtype) is given, out's error must also be at most 2x baseline's."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out.detach().double()).all(), f"{what}: non-finite values"
    err = rel_err(out, ref)
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.3e} > {REL_TOL[dtype]:.0e} ({dtype})"
    if baseline is not None and dtype in LOW_PRECISION:
        base_err = rel_err(baseline, ref)
        assert err <= 2 * base_err + 1e-6, (
            f"{what}: error {err:.3e} exceeds 2x eager {dtype} error {base_err:.3e}")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The suite is many tiny problems: a second intra-op thread mostly spin-waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Each test draws its own random data, deterministically per test name."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture
def poison_allocations(monkeypatch):
    """poison(kernel_module) makes the module's allocation hook `_new` fill every buffer it
    allocates (outputs, workspaces, partials) with NaN, so an element a kernel leaves unwritten,
    or reads before writing, fails the comparison. Returns the list of allocated buffers."""
    def poison(module):
        allocated = []

        def poisoned(t):
            allocated.append(t)
            return t.fill_(float("nan"))

        monkeypatch.setattr(module, "_new", poisoned)
        return allocated
    return poison


@pytest.fixture
def dot_tile_shapes(monkeypatch):
    """spy(kernel_module) records the operand shapes of every `_dot` the module's kernels trace
    (the GPU compiler rejects tl.dot tiles below 16). Returns the list of (a.shape, b.shape)."""
    def spy(module):
        shapes = []
        original = module._dot

        def recording(a, b, dot_dtype):
            shapes.append((tuple(a.shape), tuple(b.shape)))
            return original(a, b, dot_dtype)

        monkeypatch.setattr(module, "_dot", recording)
        return shapes
    return spy


@pytest.fixture
def forbid_launches(monkeypatch):
    """forbid(module, *kernel_names) replaces those Triton kernels by objects whose launch
    (kernel[grid](...)) fails the test: for checking that a path launches nothing."""
    def no_launch(*args, **kwargs):
        raise AssertionError("a Triton kernel was launched on CPU without the interpreter")

    class NoKernel:
        def __getitem__(self, grid):
            return no_launch

    def forbid(module, *names):
        for name in names:
            monkeypatch.setattr(module, name, NoKernel())
    return forbid


# Optional parts of an install that CI always has: a missing one fails its tests, unless the
# matching PYADAPT_ALLOW_NO_* variable asks for a skip (a pure-Python install, no clip extra).

@pytest.fixture
def needs_native():
    """Use as `pytestmark = pytest.mark.usefixtures("needs_native")` in native-backend tests."""
    require_native()


def require_native():
    """Fail (or, with PYADAPT_ALLOW_NO_NATIVE=1, skip) when pyadapt._C is not built."""
    from pyadapt.ops import _native

    if not _native.available:
        msg = f"pyadapt._C (the native cpu backend) is not built: {_native.error}"
        if os.environ.get("PYADAPT_ALLOW_NO_NATIVE", "0") == "1":
            pytest.skip(msg)
        pytest.fail(msg + " (set PYADAPT_ALLOW_NO_NATIVE=1 to skip on a pure-Python install)")


def require_triton():
    """The triton module. pyproject makes triton a dependency on Linux x86_64, so there a missing
    triton is a broken install and fails; elsewhere (no triton wheels) the test is skipped."""
    import platform

    try:
        import triton
    except ImportError as e:
        if platform.system() == "Linux" and platform.machine() == "x86_64":
            pytest.fail(f"triton is a dependency here but does not import: {e}")
        pytest.skip("triton is not installed (not a dependency on this platform)",
                    allow_module_level=True)
    return triton


def require_open_clip():
    """Import open_clip at a test module's top, offline; call before importing from it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import open_clip
    except ImportError:
        if os.environ.get("PYADAPT_ALLOW_NO_CLIP") == "1":
            pytest.skip("open_clip_torch is not installed (PYADAPT_ALLOW_NO_CLIP=1)",
                        allow_module_level=True)
        raise ImportError("these tests need open_clip_torch (the clip extra): pip install -e "
                          "'.[clip]', or set PYADAPT_ALLOW_NO_CLIP=1 to skip them") from None
    return open_clip
