"""Runtime options change how the engine runs, not what it computes (beyond rounding)."""
import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from models.stylegan2 import compute_mean_latent
from models.tiny import tiny_generator
from pipeline.engine.batch_size import largest_batch
from pipeline.bench.engine import bench_models
from pipeline.engine.editor import Editor
from pipeline.engine.rows import EditRequest
from pipeline.engine.runtime import Runtime
from pipeline.engine.settings import EditConfig

CONFIG = EditConfig.from_overrides({"steps.latent": 4, "steps.noise": 1,
                                    "loss.start_steps.classf": 1, "loss.start_steps.seg": 1,
                                    "dynamic_masking_iters": 2, "parser_size": 64})
REQUESTS = [EditRequest(("black_hair",), (1.0,), size=1.2, seed=1),
            EditRequest(("smiling",), (0.0,), seed=2)]


@pytest.fixture(scope="module")
def models():
    return bench_models("tiny", "local", "cpu")


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def eager(models, images):
    return Editor(models, CONFIG).edit(images, REQUESTS)


def max_diff(a, b, field="edited"):
    return max((getattr(x, field) - getattr(y, field)).abs().max().item() for x, y in zip(a, b))


def test_reading_the_device_every_step_changes_nothing(models, images, eager):
    plain = Editor(models, CONFIG, Runtime.plain()).edit(images, REQUESTS)
    assert max_diff(plain, eager) == 0 and max_diff(plain, eager, "latent") == 0


def test_channels_last_agrees_with_nchw_and_leaves_the_callers_networks_alone(models, images, eager):
    before = models.face_parser.model.backbone.conv1.weight.stride()
    nhwc = Editor(models, CONFIG, Runtime(channels_last=True)).edit(images, REQUESTS)
    assert models.face_parser.model.backbone.conv1.weight.stride() == before
    assert max_diff(nhwc, eager) < 1e-5 and max_diff(nhwc, eager, "latent") < 1e-4


def test_bf16_autocast_keeps_the_optimised_tensors_float32(models, images, eager):
    """CPU autocast casts other ops than CUDA's: this deviation is a proxy, see docs/speed.md."""
    seen = []
    editor = Editor(models, CONFIG, Runtime(autocast="bf16"))
    out = editor.edit(images, REQUESTS, callback=seen.append)
    assert all(r.ok and r.latent.dtype == torch.float32 for r in out)
    assert all(n.dtype == torch.float32 for n in out[0].noises)
    assert all(v.dtype == torch.float32 for s in seen for v in s.losses.values())
    assert 0 < max_diff(out, eager) < 0.05


FAULT_PROBE = """
import resource, sys, torch
from pipeline.engine.runtime import reuse_freed_memory

def faults_per_cycle():
    for _ in range(4):                      # the heap grows to its peak layout first
        torch.ones(16, 1024, 1024).sum()    # 64 MB: above glibc's largest mmap threshold
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.ones(16, 1024, 1024).sum()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4

print(reuse_freed_memory(True), faults_per_cycle())
print(reuse_freed_memory(False), faults_per_cycle())
"""


def test_reused_memory_is_not_faulted_in_again_and_the_default_comes_back():
    """A freed 64 MB activation is page-faulted in again at each allocation under glibc's
    default (16,384 pages of 4 KiB, fewer with huge pages), and not at all once reused."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", FAULT_PROBE], capture_output=True, text=True,
                         check=True, cwd=str(Path(__file__).parents[1])).stdout.split()
    if out[0] != "True":
        pytest.skip("not Linux with glibc: reuse_memory does not apply")
    reused, default = float(out[1]), float(out[3])
    assert reused < 100 and default > 20 * max(reused, 1), (reused, default)


def test_the_plain_path_keeps_glibcs_memory_handling():
    assert Runtime().reuse_memory and not Runtime.plain().reuse_memory
    with pytest.raises(ValueError, match="reuse_memory must be true or false"):
        Runtime(reuse_memory="yes")


def test_compile_auto_compiles_real_sizes_on_cpu_and_leaves_test_sizes_eager(models):
    """The rule, not the speed (the bench measures that): "auto" compiles a 256 px
    generator's networks on a CPU with a C++ compiler, not the 64 px test networks;
    true and false are obeyed as given, and the plain path never compiles."""
    from torch._dynamo.eval_frame import OptimizedModule

    from pipeline.engine.runtime import COMPILE_FROM
    large = dataclasses.replace(models, generator=tiny_generator(COMPILE_FROM).eval())
    assert Runtime().compile == "auto"
    assert not Runtime().compiles(models) and Runtime(compile=True).compiles(models)
    assert not Runtime.plain().compiles(large) and not Runtime(compile=False).compiles(large)
    # with a C++ compiler on PATH (this suite's machines; the no-compiler case is
    # test_a_compile_that_fails_runs_eagerly_with_a_warning) a real size compiles
    if shutil.which("g++") or shutil.which("c++"):
        assert Runtime().compiles(large)
    prepared = Runtime().prepare(models)              # lazy: nothing compiles until called
    assert prepared.generator is models.generator
    prepared = Runtime(compile=True).prepare(models)
    assert isinstance(prepared.generator, OptimizedModule)
    assert prepared.e4e is models.e4e                 # e4e runs once per image: not compiled
    with pytest.raises(ValueError, match="compile must be true, false or auto"):
        Runtime(compile="yes")


def process_wide() -> dict:
    """Every setting Runtime.apply may change, as this process has it now."""
    import torch._dynamo
    from models import ops
    from pipeline.engine import runtime
    return {"ops": ops._default_impl, "fp32": runtime.fp32_precision(),
            "suppress_errors": torch._dynamo.config.suppress_errors,
            "recompile_limit": torch._dynamo.config.recompile_limit,
            "reusing_memory": runtime._reusing}


@pytest.fixture
def restored():
    """The process-wide settings as they were before the test (apply() changes them)."""
    import torch._dynamo
    from models.ops import set_default_impl
    from pipeline.engine.runtime import reuse_freed_memory, set_fp32_precision
    before = process_wide()
    yield before
    set_default_impl(before["ops"])
    torch.backends.cuda.matmul.fp32_precision = "none"      # as torch starts: unset
    torch.backends.cudnn.conv.fp32_precision = "none"
    if process_wide()["fp32"] != before["fp32"]:
        set_fp32_precision(before["fp32"]["matmul"])
    torch._dynamo.config.suppress_errors = before["suppress_errors"]
    torch._dynamo.config.recompile_limit = before["recompile_limit"]
    reuse_freed_memory(before["reusing_memory"])


def test_building_an_editor_changes_nothing_process_wide_and_apply_does(models, restored):
    """An Editor, whatever its runtime, leaves the process as it found it; apply() sets what
    the runtime asks, and says what stays set until the process exits."""
    from pipeline.engine.runtime import RECOMPILE_LIMIT
    other_ops = "cuda" if restored["ops"] != "cuda" else "ref"
    wants = Runtime(compile=True, ops=other_ops, tf32=True, channels_last=True,
                    reuse_memory=not restored["reusing_memory"])
    Editor(models, CONFIG, wants)
    assert process_wide() == restored
    permanent = wants.apply(torch.device("cpu"))
    now = process_wide()
    assert now["ops"] == other_ops and now["reusing_memory"] == wants.reuse_memory
    # a network is more graphs than dynamo's default limit of 8 (grad modes, phases,
    # batch sizes); past the limit it would run eagerly without a word in the results
    assert now["recompile_limit"] >= RECOMPILE_LIMIT and now["suppress_errors"] is True
    assert now["fp32"] == restored["fp32"]                 # CUDA only: not on a CPU
    if wants.reuse_memory and now["reusing_memory"]:
        assert any("glibc" in p for p in permanent)          # said: cannot be undone


def test_on_cuda_fp32_means_ieee_for_matmuls_and_convolutions_and_tf32_means_both(restored):
    """cuDNN's convolutions run TF32 by default in PyTorch: the runtime sets both ops both
    ways (the flags need no GPU to be set and read)."""
    from pipeline.engine.runtime import fp32_precision
    assert restored["fp32"]["conv"] == "tf32"              # torch's own default
    Runtime(tf32=True, reuse_memory=False).apply(torch.device("cuda"))
    assert fp32_precision() == {"matmul": "tf32", "conv": "tf32"}
    Runtime(reuse_memory=False).apply(torch.device("cuda"))
    assert fp32_precision() == {"matmul": "ieee", "conv": "ieee"}


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="autocast must be one of"):
        Runtime(autocast="int8")
    with pytest.raises(ValueError, match="ops must be one of"):
        Runtime(ops="triton")


def test_the_batch_probe_finds_the_largest_size_that_fits():
    """CUDA's out-of-memory error raised by a stand-in at a known size: on a CPU a real
    one kills the process, so the probe only runs on GPUs (tests/test_gpu.py)."""
    for limit, cap, want in ((3, 16, 3), (16, 16, 16), (100, 16, 16), (1, 8, 1), (6, 7, 6)):
        tried = []

        def fits(n, limit=limit):
            tried.append(n)
            if n > limit:
                raise torch.cuda.OutOfMemoryError(f"{n} images do not fit")
        assert largest_batch(fits, cap) == want
        assert len(tried) <= 2 * cap.bit_length()          # doubling, then bisection
    with pytest.raises(RuntimeError, match="not even one image"):
        largest_batch(lambda n: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("no")), 4)


@pytest.mark.compile
def test_torch_compile_agrees_with_eager_forward_and_backward():
    """Inductor (its C++ backend here) on a 32 px generator, compiled as the Runtime
    compiles it: batch 2 first (a static graph), then batch 3 (the dynamic-batch graph
    that serves every later size), then batch 4, which compiles nothing new. The image
    and the latent's gradient of a masked recon loss are eager's to float32 rounding. The
    generator alone: compiling the engine's four networks with their backward takes
    minutes on 2 cores (the bench reports compile time as the first step's extra time)."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    g = tiny_generator(32).eval().requires_grad_(False)
    models = bench_models("tiny", "local", "cpu")
    runtime = Runtime(compile=True)
    runtime.apply(torch.device("cpu"))                # dynamo's limits, as an actor sets them
    compiled = runtime.prepare(dataclasses.replace(models, generator=g)).generator

    def image_and_grad(net, batch):
        gen = torch.Generator().manual_seed(batch)
        latent = compute_mean_latent(g, 64).view(1, 1, -1).repeat(batch, g.n_latent, 1)
        w = (latent + 0.1 * torch.randn(latent.shape, generator=gen)).requires_grad_(True)
        noises = g.make_noise(batch, "randn", gen)
        target = torch.rand(batch, 3, 32, 32, generator=gen)
        image = net(w, noises)
        ((image - target) ** 2).mean().backward()
        return image.detach(), w.grad

    for batch in (2, 3, 4):
        graphs = counters["stats"]["unique_graphs"]
        eager_image, eager_grad = image_and_grad(g, batch)
        image, grad = image_and_grad(compiled, batch)
        torch.testing.assert_close(image, eager_image, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad, eager_grad, rtol=1e-3, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == graphs     # batch 4: the dynamic graph served


COMPILE_FAILS = """
import dataclasses, torch, torch._inductor.config as inductor
from models.tiny import tiny_generator
from pipeline.bench.engine import bench_models
from pipeline.engine.runtime import COMPILE_FROM, Runtime
inductor.cpp.cxx = ("/nonexistent/c++",)         # a CPU node without a C++ compiler
inductor.fx_graph_cache = False                  # and nothing compiled before to reuse
models = bench_models("tiny", "local", "cpu")
large = dataclasses.replace(models, generator=tiny_generator(COMPILE_FROM).eval())
print("AUTO-COMPILES" if Runtime().compiles(large) else "AUTO-EAGER")
g = models.generator
latent = models.mean_latent.view(1, 1, -1).repeat(1, g.n_latent, 1)
noises = g.make_noise(1)
want = g(latent, noises)
runtime = Runtime(compile=True)
runtime.apply(torch.device("cpu"))
got = runtime.prepare(models).generator(latent, noises)
print("EQUAL" if torch.equal(got, want) else "DIFFERENT")
"""


@pytest.mark.compile
def test_a_compile_that_fails_runs_eagerly_with_a_warning():
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-c", COMPILE_FAILS], capture_output=True, text=True,
                         cwd=str(Path(__file__).parents[1]), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-1] == "EQUAL"
    assert run.stdout.split()[0] == "AUTO-EAGER"    # "auto" does not even try without one
    assert "nonexistent" in run.stderr              # the failure was reported, not hidden
