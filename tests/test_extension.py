"""Our compiled ops: the kernels' arithmetic (through its CPU twin), the CUDA build,
the build cache, and the fall-back to the reference when a build fails."""
import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from models import extension
from models.ops import fused_leaky_relu_ref, make_kernel, upfirdn2d, upfirdn2d_ref
from test_ops import upfirdn_by_definition

pytestmark = pytest.mark.compile
REPO_BUILD = Path(__file__).parent.parent / "build" / "ext"     # kept between local runs


@pytest.fixture
def build_cache(monkeypatch):
    monkeypatch.setenv("MASKFACE_EXT_CACHE", str(REPO_BUILD))
    return REPO_BUILD


@pytest.fixture
def twin(build_cache):
    ops = extension.load_ops("cpu")
    assert ops is not None, "the CPU twin did not build: see the warning above"
    return ops


CASES = [(1, 1, (2, 1)), (2, 1, (2, 1)), (1, 2, (1, 1)), (2, 1, (-1, 2)), (2, 2, (3, -1)),
         (4, 1, (1, 4)), (1, 1, (0, 0))]


@pytest.mark.parametrize("up,down,pad", CASES)
def test_the_kernels_arithmetic_is_the_definition_forward_and_backward(twin, up, down, pad):
    """ops.cu and cpu_twin.cpp run the same per-element functions (csrc/kernels.h)."""
    g = torch.Generator().manual_seed(up * 10 + down)
    for k in (make_kernel((1, 3, 3, 1), gain=4), torch.randn(3, 5, generator=g)):
        x = torch.randn(2, 3, 9, 7, generator=g, dtype=torch.float64, requires_grad=True)
        k = k.double()
        got = twin.upfirdn2d(x.detach(), k, up, down, *pad)
        if k.shape[0] == k.shape[1] and x.shape[2] == x.shape[3]:
            torch.testing.assert_close(got.float(), upfirdn_by_definition(x.detach(), k, up, down, pad))
        want = upfirdn2d_ref(x, k, up, down, pad)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        gy = torch.randn(want.shape, generator=g, dtype=torch.float64)
        want.backward(gy)
        torch.testing.assert_close(twin.upfirdn2d_grad(gy, k, up, down, *pad, 9, 7), x.grad,
                                   rtol=0, atol=1e-12)


def test_bias_act_forward_and_backward_with_exact_zeros(twin):
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    x[0, :, 0, 0] = -b                              # pre-activation exactly 0: the slope applies
    x.requires_grad_(True)
    y = fused_leaky_relu_ref(x, b)
    gy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(gy)
    torch.testing.assert_close(twin.bias_act(x.detach(), b, 0.2, 2 ** 0.5), y.detach(),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(twin.bias_act_grad(gy, y.detach(), 0.2, 2 ** 0.5), x.grad,
                               rtol=0, atol=1e-12)


def test_a_build_is_cached_and_made_under_a_temporary_name(twin, build_cache, monkeypatch):
    final = build_cache / f"maskface_cpu_ops_{extension.build_key('cpu')}"
    assert final.is_dir() and list(final.glob("*.so")) and not list(build_cache.glob(".tmp-*"))

    def compile_again(*args, **kwargs):
        raise AssertionError("the cached build was compiled again")
    monkeypatch.setattr(cpp_extension, "load", compile_again)
    again = extension.build("cpu")              # found in the cache, not compiled again
    assert {"upfirdn2d", "bias_act"} <= set(dir(again))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc absent: the CUDA kernels "
                    "cannot be compiled here")
def test_the_cuda_kernels_compile(build_cache, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    ops = extension.build("cuda")
    assert {"upfirdn2d", "upfirdn2d_grad", "bias_act", "bias_act_grad"} <= set(dir(ops))


def test_a_failed_build_warns_once_and_the_reference_runs(tmp_path, monkeypatch, caplog):
    broken = tmp_path / "csrc"
    shutil.copytree(extension.CSRC, broken)
    for name in ("cpu_twin.cpp", "bindings.cpp"):          # fails at once, no headers parsed
        (broken / name).write_text("#error deliberately broken\n")
    monkeypatch.setattr(extension, "CSRC", broken)
    monkeypatch.setenv("MASKFACE_EXT_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="models.extension"):
        assert extension.load_ops("cpu") is None
        assert extension.load_ops("cpu") is None
    warnings = [r for r in caplog.records if "using the PyTorch reference" in r.getMessage()]
    assert len(warnings) == 1                                       # once, not per call
    assert not list((tmp_path / "cache").glob(".tmp-*"))           # no half build left


def test_without_a_gpu_or_an_arch_list_the_cuda_ops_explain_themselves(monkeypatch, tmp_path, caplog):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setenv("MASKFACE_EXT_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="models.extension"):
        assert extension.load_ops("cuda") is None
    assert "TORCH_CUDA_ARCH_LIST" in caplog.text
    x = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(upfirdn2d(x, make_kernel((1, 3, 3, 1))),     # auto: reference
                               upfirdn2d_ref(x, make_kernel((1, 3, 3, 1))))
