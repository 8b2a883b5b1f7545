"""GPU paths against their CPU reference. Skipped on machines without CUDA."""
import pytest
import torch

from models.ops import make_kernel, upfirdn2d
from models.tiny import tiny_generator

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytestmark = [pytest.mark.gpu, cuda]


def test_upfirdn2d_on_cuda_matches_cpu():
    x = torch.randn(2, 8, 16, 16)
    k = make_kernel([1, 3, 3, 1], gain=4)
    want = upfirdn2d(x, k, up=2, pad=(2, 1))
    got = upfirdn2d(x.cuda(), k.cuda(), up=2, pad=(2, 1)).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.fixture(autouse=True)
def fp32():
    """Each test starts in IEEE float32 on the GPU, as the runtime sets it (TF32
    convolutions would differ from the CPU by ~1e-3 for reasons not ours), and leaves
    the precision as it found it."""
    from pipeline.engine.runtime import Runtime, fp32_precision, set_fp32_precision
    before = fp32_precision()
    Runtime(reuse_memory=False).apply(torch.device("cuda"))
    yield
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.backends.cudnn.conv.fp32_precision = "none"
    if fp32_precision() != before:
        set_fp32_precision(before["matmul"])


def test_generator_on_cuda_matches_cpu():
    torch.manual_seed(0)
    g = tiny_generator(64, style_dim=32).eval()
    latent = torch.randn(2, g.n_latent, 32)
    noise = g.make_noise(2, "randn", torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = g(latent, noise)
        g = g.cuda()
        got = g(latent.cuda(), [n.cuda() for n in noise]).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_our_cuda_ops_match_the_reference_forward_and_backward():
    from models import ops
    from models.extension import load_ops
    assert load_ops("cuda") is not None and ops.self_check(load_ops("cuda"), torch.device("cuda"))
    k = make_kernel([1, 3, 3, 1], gain=4)
    for up, down, pad in ((2, 1, (2, 1)), (1, 1, (1, 1)), (1, 2, (1, 1))):
        x = torch.randn(4, 16, 32, 32, device="cuda", requires_grad=True)
        y_ref = upfirdn2d(x, k.cuda(), up, down, pad, impl="ref")
        gy = torch.randn_like(y_ref)
        (g_ref,) = torch.autograd.grad(y_ref, x, gy)
        y = upfirdn2d(x, k.cuda(), up, down, pad, impl="cuda")
        (g,) = torch.autograd.grad(y, x, gy)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    x = torch.randn(4, 16, 8, 8, device="cuda", requires_grad=True)
    b = torch.randn(16, device="cuda", requires_grad=True)
    y_ref = ops.fused_leaky_relu(x, b, impl="ref")
    gy = torch.randn_like(y_ref)
    want = torch.autograd.grad(y_ref, (x, b), gy)
    got = torch.autograd.grad(ops.fused_leaky_relu(x, b, impl="cuda"), (x, b), gy)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)


def test_an_edit_runs_on_cuda_in_every_precision():
    from pipeline.bench.engine import bench_models
    from pipeline.engine.editor import Editor
    from pipeline.engine.rows import EditRequest
    from pipeline.engine.runtime import Runtime
    from pipeline.engine.settings import EditConfig
    models = bench_models("tiny", "local", "cuda")
    config = EditConfig.from_overrides({"steps.latent": 4, "steps.noise": 1, "parser_size": 64,
                                        "loss.start_steps.classf": 1, "loss.start_steps.seg": 1})
    x = torch.rand(2, 3, 64, 64, device="cuda")
    requests = [EditRequest(("black_hair",), (1.0,), size=1.2)] * 2
    base = Editor(models, config).edit(x, requests)
    for runtime in (Runtime(tf32=True), Runtime(autocast="bf16"), Runtime(channels_last=True)):
        runtime.apply(torch.device("cuda"))                # TF32 is process-wide: applied
        out = Editor(models, config, runtime).edit(x, requests)
        assert all(r.ok and r.latent.dtype == torch.float32 for r in out)
        assert max((a.edited - b.edited).abs().max().item() for a, b in zip(out, base)) < 0.05


def test_the_batch_probe_backs_off_on_a_real_out_of_memory():
    """The real 1024 px networks with a cap no GPU holds (a step at 1024 px takes GBs per
    image): the probe must meet CUDA's out-of-memory error, back off, and find a batch
    that then runs."""
    from pipeline.engine.batch_size import HEAVIEST_STEPS, auto_batch_size
    from pipeline.bench.engine import bench_models
    from pipeline.engine.editor import Editor, StartPoint
    from pipeline.engine.rows import EditRequest
    from pipeline.engine.runtime import Runtime
    from pipeline.engine.settings import EditConfig
    models = bench_models("1024", "local", "cuda")
    cap = 1024
    ooms = torch.cuda.memory_stats().get("num_ooms", 0)
    size = auto_batch_size(models, Runtime(), "local", cap=cap, parser_size=512)
    assert torch.cuda.memory_stats()["num_ooms"] > ooms     # a real out-of-memory was met
    assert 1 <= size < cap
    g = models.generator
    latent = models.mean_latent.view(1, 1, -1).repeat(size, g.n_latent, 1)
    editor = Editor(models, EditConfig.from_overrides({**HEAVIEST_STEPS, "parser_size": 512}))
    out = editor.edit(torch.rand(size, 3, 1024, 1024, device="cuda"),
                      [EditRequest(("black_hair",), (1.0,), size=1.2)] * size,
                      start=StartPoint(latent=latent, step=0))
    assert all(r.ok for r in out)


@pytest.mark.compile
def test_a_compiled_edit_on_cuda_agrees_with_eager():
    """Inductor's Triton kernels against eager on the GPU, the numbers a GPU bench with
    `--compile` would stand on (`compile: auto` keeps GPUs eager until one is measured)."""
    from pipeline.bench.engine import bench_models
    from pipeline.engine.editor import Editor
    from pipeline.engine.rows import EditRequest
    from pipeline.engine.runtime import Runtime
    from pipeline.engine.settings import EditConfig
    models = bench_models("tiny", "local", "cuda")
    config = EditConfig.from_overrides({"steps.latent": 4, "steps.noise": 1, "parser_size": 64,
                                        "loss.start_steps.classf": 1, "loss.start_steps.seg": 1})
    x = torch.rand(2, 3, 64, 64, device="cuda")
    requests = [EditRequest(("black_hair",), (1.0,), size=1.2)] * 2
    eager = Editor(models, config, Runtime(compile=False)).edit(x, requests)
    compiling = Runtime(compile=True)
    compiling.apply(torch.device("cuda"))                  # dynamo's limits, as an actor does
    compiled = Editor(models, config, compiling).edit(x, requests)
    assert all(r.ok for r in compiled)
    assert max((a.edited - b.edited).abs().max().item() for a, b in zip(compiled, eager)) < 1e-3
