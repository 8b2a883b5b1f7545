"""The bench's machinery: step kinds, their counts, and running exactly one kind through
the real engine. (Speed itself is a figure `maskface bench` prints, never a test.)"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.engine.bench import BENCH_EDIT, bench_models, bench_schedule, kind_config, step_kinds
from pipeline.engine.editor import Editor, StartPoint

MASKFACE = str(Path(sys.executable).parent / "maskface")


def paper_schedule(mode):
    return bench_schedule(mode, {})[1]


def test_an_edit_at_paper_defaults_is_counted_by_kind():
    local = {k.name: k for k in step_kinds(paper_schedule("local"))}
    assert {n: k.count for n, k in local.items()} == {
        "recon": 500, "recon+classf+seg+size+parser": 500, "noise": 501}
    assert local["recon"].first == 0 and local["recon+classf+seg+size+parser"].first == 500
    glob = {k.name: k.count for k in step_kinds(paper_schedule("global"))}
    assert glob == {"recon+classf": 200, "recon+classf+size+parser": 500, "noise": 501}
    assert sum(glob.values()) == paper_schedule("global").total_iterations == 1201


@pytest.mark.parametrize("kind_name", ["recon", "recon+classf+seg+size+parser", "noise"])
def test_a_kinds_run_is_exactly_that_kind(kind_name):
    """What the bench times is what an edit runs at those steps."""
    models = bench_models("tiny", "local", "cpu")
    kind = next(k for k in step_kinds(paper_schedule("local")) if k.name == kind_name)
    config, first = kind_config({"parser_size": 64}, kind, 2)
    g, seen = models.generator, []
    latent = models.mean_latent.view(1, 1, -1).repeat(1, g.n_latent, 1)
    Editor(models, config).edit(torch.rand(1, 3, 64, 64), [BENCH_EDIT["local"]],
                                start=StartPoint(latent=latent, step=first), callback=seen.append)
    want = {"noise": ("n_loss", "recon"), "recon": ("recon",)}.get(
        kind_name, ("recon", "classf", "seg", "size"))
    assert [tuple(s.losses) for s in seen] == [want, want]


def test_the_bench_prints_a_complete_document(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([MASKFACE, "bench", "--preset", "tiny", "--batch", "1", "--steps", "1",
                             "--baseline", "--json", str(out)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"default", "baseline"}
    run = report["runs"]["default"][0]
    assert sum(k["count"] for k in run["kinds"].values()) == run["steps_per_edit"] == 1501
    assert all(k["flops"] > 0 and k["seconds"] > 0 for k in run["kinds"].values())
    assert run["images_per_hour"] == pytest.approx(3600 / run["seconds_per_edit"])
    peak = report["env"]["peak_flops_per_s"]
    assert run["mfu"] == pytest.approx(run["achieved_flops_per_s"] / peak)
    assert peak == max(max(s.values()) for s in report["env"]["peak_samples"])
    assert set(report["env"]["peak_samples"][0]) == {"matmul", "conv3x3"}
    assert set(run["phases_ms_per_step"]) == {"generator", "parser", "classifier", "optimizer"}
    saving = report["prefix_saving_14_attributes"]
    assert saving["steps_saved"] == pytest.approx(1 - (2 * 500 + 14 * 1001) / (14 * 1501))
    assert "default / baseline, batch 1" in result.stderr and report["peak_memory_bytes"] > 0
    # at test sizes the default path is eager and bit-identical to the plain one
    assert report["runtime"]["compile"] == "auto" and report["runtime"]["compiled"] is False
    deviation = report["deviation_from_baseline"]
    assert deviation["steps"] == 11 and deviation["edited_max_abs"] == 0
    assert deviation["latent_max_abs"] == 0 and deviation["prob_result_max_abs"] == 0
    assert "deviation from the plain path after a 11-step edit" in result.stderr


def test_the_bench_refuses_batch_auto_without_a_gpu_before_building_anything():
    result = subprocess.run([MASKFACE, "bench", "--device", "cpu", "--batch", "auto"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--batch auto probes GPU memory" in result.stderr
    result = subprocess.run([MASKFACE, "bench", "--batch", "0"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "positive sizes or auto, got '0'" in result.stderr
