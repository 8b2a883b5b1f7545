"""The bench's machinery: step kinds, their counts, and running exactly one kind through
the real engine. (Speed itself is a figure `maskface bench` prints, never a test.)"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.bench.document import prefix_saving
from pipeline.bench.engine import BENCH_EDIT, bench_models, bench_schedule, kind_config, step_kinds
from pipeline.bench.payback import payback_edits
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
    assert "seconds_per_edit" not in run and "images_per_hour" not in run   # named for what they are
    assert all(k["flops"] > 0 and k["seconds"] > 0 for k in run["kinds"].values())
    assert 0 < run["mfu"] < 2 and set(report["env"]["peak_samples"][0]) == {"matmul", "conv3x3"}
    assert report["env"]["fp32_precision"] == {"matmul": "ieee", "conv": "ieee"}
    assert set(run["phases_ms_per_step"]) == {"generator", "parser", "classifier", "optimizer"}
    # the documented figure: 28.6% fewer steps for 14 local attributes of one image
    assert round(report["prefix_saving_14_attributes"]["steps_saved"], 3) == 0.286
    warm = report["warm_up"]
    assert set(warm["runs"]) == {"baseline", "default"} and warm["first_measured"] == "baseline"
    assert all(w["steps"] == 11 and w["first_use_s"] >= 0 for w in warm["runs"].values())
    assert warm["whole_s"]["default"] >= warm["process_start_to_networks_s"] > 0
    assert "extrapolated" in result.stderr and "warm-up, whole" in result.stderr
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


def test_the_flop_counter_counts_a_modulated_conv_as_counted_by_hand():
    """The bench's FLOPs, checked against a count made independently: one modulated 3x3
    conv of StyleGAN2 (4 -> 8 channels at 8x8, style 16, batch 2): the modulation (a
    linear layer), the convolution and the demodulation (a matmul), 2 FLOPs a multiply-add."""
    from models.stylegan2 import ModulatedConv2d
    from pipeline.bench.engine import flop_counter
    conv = ModulatedConv2d(4, 8, 3, style_dim=16)
    x, style = torch.randn(2, 4, 8, 8), torch.randn(2, 16)
    counter = flop_counter()
    with counter:
        conv(x, style)
    n, cin, cout, k, pixels, s = 2, 4, 8, 3, 8 * 8, 16
    by_hand = 2 * n * (s * cin + cout * cin * k * k * pixels + cin * cout)
    assert counter.get_total_flops() == by_hand
    counter = flop_counter()
    x.requires_grad_(True)
    with counter:
        conv(x, style).sum().backward()
    assert counter.get_total_flops() > 2 * by_hand        # and the backward counts too


def test_a_shared_prefix_saves_its_steps_and_time_on_every_edit_but_one_per_mask():
    run = {"kinds": {"recon": {"count": 10, "seconds": 0.5}}, "steps_per_edit": 100,
           "extrapolated_seconds_per_edit": 20.0, "batch": 1}
    saving = prefix_saving(run, attributes=14, prefixes=2)
    assert (saving["steps_without"], saving["steps_with"]) == (1400, 2 * 10 + 14 * 90)
    assert saving["steps_saved"] == pytest.approx(1 - 1280 / 1400)
    assert saving["time_saved"] == pytest.approx(1 - (2 * 5 + 14 * 15) / (14 * 20))
    assert prefix_saving({**run, "kinds": {}}) == {}           # no recon step: nothing shared


def test_payback_is_the_extra_warm_up_over_the_time_saved_per_edit():
    slow, fast = ({"extrapolated_seconds_per_edit": s} for s in (10.0, 6.0))
    assert payback_edits(slow, 5.0, fast, 25.0) == 5.0          # 20 s more, 4 s saved an edit
    assert payback_edits(slow, 30.0, fast, 25.0) == 0.0         # it warms up no slower
    assert payback_edits(fast, 5.0, slow, 25.0) is None         # its edits are not faster


def test_payback_says_after_how_many_edits_a_longer_warm_up_is_bought_back(tmp_path):
    """Two bench documents made by hand: 100 s more warm-up, 20 s less per edit: 5 edits."""
    def document(warm_s, edit_s):
        return {"preset": "1024", "mode": "local", "env": {"device": "cuda"},
                "runs": {"default": [{"batch": 8, "extrapolated_seconds_per_edit": edit_s}]},
                "warm_up": {"whole_s": {"default": warm_s}}}
    for name, doc in (("eager", document(30.0, 60.0)), ("compiled", document(130.0, 40.0)),
                      ("slower", document(130.0, 70.0))):
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    run = subprocess.run([MASKFACE, "bench", "--payback", str(tmp_path / "eager.json"),
                          str(tmp_path / "compiled.json")], capture_output=True, text=True)
    assert run.returncode == 0 and "pays back its warm-up after 5.0 edit(s)" in run.stdout
    run = subprocess.run([MASKFACE, "bench", "--payback", str(tmp_path / "eager.json"),
                          str(tmp_path / "slower.json")], capture_output=True, text=True)
    assert "never pays back" in run.stdout
