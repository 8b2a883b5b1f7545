"""`make gpu-check`'s preflight: it lists what the GPU run needs and refuses, before any
model is built, where something is missing (here, on a CPU machine: the GPU itself)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def preflight(env=None):
    return subprocess.run([sys.executable, "-m", "jobs.gpu_preflight"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_preflight_refuses_without_a_gpu_and_names_it():
    import torch
    run = preflight()
    if torch.cuda.is_available():                          # a GPU machine: it passes
        assert run.returncode == 0, run.stdout + run.stderr
        return
    assert run.returncode == 1
    assert "MISSING  a CUDA device torch can use" in run.stdout
    assert "ok       python module torch" in run.stdout    # the rest was checked too
    assert "stopping before any model is built" in run.stderr


def test_the_preflight_names_every_missing_tool():
    env = {**os.environ, "PATH": "/nonexistent", "CUDA_HOME": "/nonexistent"}
    run = preflight(env)
    assert run.returncode == 1
    for tool in ("nvcc", "host C++ compiler (c++ or g++)", "ninja", "make"):
        assert f"MISSING  {tool}" in run.stdout, run.stdout
    assert "missing: nvcc, host C++ compiler (c++ or g++), ninja, make" in run.stderr


# --no-print-directory: under `make test` the outer make's MAKELEVEL would have the inner
# one print "Entering directory" first
MAKE_PLAN = ["make", "--no-print-directory", "-n", "gpu-check"]


def test_make_gpu_check_runs_the_preflight_first_and_falls_back_to_python3(tmp_path):
    """`make -n` shows the recipe: the preflight before anything else, and GPU_PY is
    python3 where the repo has no venv."""
    bare = tmp_path / "checkout"
    bare.mkdir()
    (bare / "Makefile").write_text((ROOT / "Makefile").read_text())
    plan = subprocess.run(MAKE_PLAN, cwd=bare, capture_output=True,
                          text=True, timeout=60).stdout.splitlines()
    assert plan[0] == "python3 -m jobs.gpu_preflight"
    (bare / ".venv" / "bin").mkdir(parents=True)
    (bare / ".venv" / "bin" / "python").write_text("")
    plan = subprocess.run(MAKE_PLAN, cwd=bare, capture_output=True,
                          text=True, timeout=60).stdout.splitlines()
    assert plan[0] == ".venv/bin/python -m jobs.gpu_preflight"
