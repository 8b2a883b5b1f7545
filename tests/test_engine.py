import copy

import pytest
import torch
from helpers import faces_near_mean

from models.classifier import ATTRIBUTE_INDEX
from models.face_parser import CLASS_INDEX, region_masks
from pipeline.engine.attributes import LOCAL_ATTRIBUTES
from pipeline.engine.editor import Editor, StartPoint
from pipeline.engine.rows import EditRequest
from pipeline.engine.schedule import Schedule, shared_prefix
from pipeline.engine.settings import EditConfig
from pipeline.errors import SetupError

FEW_STEPS = {"steps.latent": 6, "steps.noise": 2, "loss.start_steps.classf": 2,
             "loss.start_steps.seg": 2, "dynamic_masking_iters": 2, "e4e_start_step": 3,
             "parser_size": 64}


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models


@pytest.fixture(scope="module")
def faces(models):
    return faces_near_mean(models, 3, seed=0)


def run(models, images, requests, overrides=None, **kwargs):
    steps = []
    editor = Editor(models, EditConfig.from_overrides({**FEW_STEPS, **(overrides or {})}))
    results = editor.edit(images, requests, callback=steps.append, **kwargs)
    return results, steps


# ---- the optimisation does what it is for ---------------------------------------------------
def test_inversion_drives_the_masked_recon_down(models, faces):
    overrides = {"steps.latent": 60, "steps.noise": 0, "loss.weights.classf": 0,
                 "loss.weights.seg": 0, "optimizer.lr_latent": 0.03, "dynamic_masking": False}
    _, steps = run(models, faces[:1], [EditRequest(("smiling",), (1.0,))], overrides)
    recon = [s.losses["recon"][0].item() for s in steps]
    assert recon[-1] <= 0.1 * recon[0]


def test_the_classifier_term_moves_the_probability_toward_the_target(models, faces):
    """Real BranchedTiny architecture; make-tiny gives it He-normal weights so that its
    logits respond to the image (PyTorch's default init leaves them constant)."""
    overrides = {"steps.latent": 40, "steps.noise": 0, "loss.start_steps.classf": 0,
                 "loss.weights.classf": 1.0, "optimizer.lr_latent": 0.02,
                 "dynamic_masking": False}
    probs = {}
    for target in (0.0, 1.0):
        (result,), steps = run(models, faces[:1], [EditRequest(("smiling",), (target,))],
                               overrides)
        kl = [s.losses["classf"][0].item() for s in steps]
        assert kl[-1] < kl[0]
        with torch.no_grad():
            probs[target] = torch.sigmoid(models.classifier(result.generated[None]))[0, 14].item()
        recon = [s.losses["recon"][0].item() for s in steps]
        assert recon[-1] < recon[0]          # the rest of the face is still reconstructed
    start = result.metrics["prob_input"]["smiling"]
    assert probs[0.0] < start < probs[1.0]
    assert probs[1.0] - probs[0.0] > 0.01


def test_the_blend_identity_holds(models, faces):
    (result,), _ = run(models, faces[:1], [EditRequest(("smiling",), (1.0,))])
    x = faces[0]
    torch.testing.assert_close(result.edited - x, result.masks["blend"] * (result.generated - x),
                               rtol=0, atol=2e-7)


def test_where_the_blend_mask_is_zero_the_input_comes_back_bit_for_bit(models, faces):
    """A parser whose background logit dominates gives probabilities of exactly 0 elsewhere,
    so a no_skin mouth edit has a blend mask of exactly 0."""
    sure = copy.copy(models)
    sure.face_parser = copy.deepcopy(models.face_parser)
    with torch.no_grad():
        sure.face_parser.model.classifier[4].bias[CLASS_INDEX["background"]] = 1e4
    (result,), _ = run(sure, faces[:1], [EditRequest(("smiling",), (1.0,), blend="no_skin")])
    assert (result.masks["blend"] == 0).all()
    assert torch.equal(result.edited, faces[0])


@pytest.fixture(scope="module")
def m64(models):
    out = copy.copy(models)
    for name in ("generator", "face_parser", "classifier", "e4e", "lpips", "judge"):
        setattr(out, name, copy.deepcopy(getattr(models, name)).double())
    out.mean_latent = models.mean_latent.double()
    return out


def test_batching_is_invisible(m64, faces):
    """Float64: each image of a mixed batch equals its result run alone, within 1e-5."""
    x = faces.double()
    requests = [EditRequest(("smiling",), (1.0,), seed=1),
                EditRequest(("black_hair", "wavy_hair"), (1.0, 0.0), size=1.2, seed=2),
                EditRequest(("big_nose",), (0.0,), blend="no_skin", seed=3)]
    together, _ = run(m64, x, requests)
    for k in range(3):
        (alone,), _ = run(m64, x[k:k + 1], [requests[k]])
        assert together[k].ok and alone.ok
        torch.testing.assert_close(together[k].edited, alone.edited, rtol=0, atol=1e-5)
        torch.testing.assert_close(together[k].latent, alone.latent, rtol=0, atol=1e-5)
        for a, b in zip(together[k].noises, alone.noises):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# ---- coverage of attributes and schedule ---------------------------------------------------
def test_every_attribute_runs_in_its_mode(models, faces):
    names = sorted(LOCAL_ATTRIBUTES) + ["male", "young", "pale_skin", "eyeglasses"]
    requests = [EditRequest((a,), (1.0,)) for a in names]
    images = faces[torch.arange(len(names)) % 3]
    results, steps = run(models, images, requests, {"steps.noise": 1})
    for name, result in zip(names, results):
        assert result.ok, (name, result.error)
        assert result.metrics["mode"] == ("local" if name in LOCAL_ATTRIBUTES else "global")
        assert set(result.metrics["prob_result"]) == {name}
    local_rows = [i for i, a in enumerate(names) if a in LOCAL_ATTRIBUTES]
    hair_rows = [i for i, a in enumerate(names) if "hair" in a]
    dynamic_steps = [s for s in steps if "dynamic_update" in s.events]
    assert dynamic_steps and all(set(s.rows) == set(local_rows) for s in dynamic_steps)
    seg = next(s for s in steps if "seg" in s.losses and s.phase == "latent")
    for pos, row in enumerate(seg.rows):
        if row in hair_rows:
            assert seg.losses["seg"][pos].item() > 0


def test_hair_shape_brings_in_the_ears(models, faces):
    """Zero steps (start at the last step): the masks are the initial ones."""
    requests = [EditRequest(("black_hair",), (1.0,)), EditRequest(("wavy_hair",), (1.0,))]
    x = faces[:1].repeat(2, 1, 1, 1)
    (colour, shape), _ = run(models, x, requests, start=StartPoint(step=FEW_STEPS["steps.latent"]))
    probs = models.face_parser(x[:1], out_size=64)
    ears = region_masks(probs, [["ears"]])[0]
    for name in ("recon", "blend", "shape"):
        torch.testing.assert_close(shape.masks[name] - colour.masks[name], ears,
                                   rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shape.masks["dynamic"], colour.masks["dynamic"])


def test_the_schedule_is_observed_step_by_step(models, faces):
    overrides = {"steps.latent": 12, "steps.noise": 2, "loss.start_steps.classf": 3,
                 "loss.start_steps.seg": 5, "dynamic_masking_iters": 4, "e4e_start_step": 7}
    _, steps = run(models, faces[:2], [EditRequest(("smiling",), (1.0,)),
                                      EditRequest(("male",), (1.0,))], overrides)
    local = [s for s in steps if s.rows == [0] and s.phase == "latent"]
    glob = [s for s in steps if s.rows == [1] and s.phase == "latent"]
    assert [s.step for s in local] == list(range(12))
    assert [s.step for s in local if "adam_reinit" in s.events] == [3]
    assert [s.step for s in local if "noise_redraw" in s.events] == [9]
    assert [s.step for s in local if "dynamic_update" in s.events] == [5, 6, 7, 8]
    assert [s.step for s in local if "classf" in s.losses][0] == 3
    assert [s.step for s in glob] == list(range(7, 12))       # starts from e4e at step 7
    assert "e4e_init" in glob[0].events
    assert all("classf" in s.losses for s in glob)           # classifier on from the start
    assert not any("adam_reinit" in s.events or "dynamic_update" in s.events for s in glob)
    assert [s.step for s in glob if "noise_redraw" in s.events] == [9]
    noise = [s.step for s in steps if s.phase == "noise" and s.rows == [0]]
    assert noise == [0, 1, 2]                                 # steps.noise + 1 iterations


def test_user_overrides_win_over_derived_settings(models, faces):
    _, steps = run(models, faces[:1], [EditRequest(("male",), (1.0,))],
                   {"dynamic_masking": True, "optimizer.reinit": True,
                    "loss.start_steps.classf": 4})
    latent = [s for s in steps if s.phase == "latent"]
    assert [s.step for s in latent if "adam_reinit" in s.events] == [4]
    assert [s.step for s in latent if "classf" in s.losses][0] == 4


# ---- failures stay with their image ---------------------------------------------------------
def test_a_numeric_blow_up_fails_only_that_image(models, faces):
    x = faces.clone()
    x[1, :, 10:20, 10:20] = float("nan")
    requests = [EditRequest(("smiling",), (1.0,)) for _ in range(3)]
    results, _ = run(models, x, requests)
    assert results[0].ok and results[2].ok
    assert not results[1].ok and "numeric blow-up" in results[1].error
    (alone,), _ = run(models, x[2:3], requests[2:3])
    torch.testing.assert_close(results[2].edited, alone.edited, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs,message", [
    (dict(attributes=("smilling",), targets=(1.0,)),
     r"unknown attribute\(s\) \['smilling'\]; did you mean 'smiling'\?"),
    (dict(attributes=("smiling",), targets=(1.5,)), r"targets must be numbers in \[0, 1\]"),
    (dict(attributes=("smiling",), targets=(1.0,), size=-0.5), "size must be"),
    (dict(attributes=("smiling", "male"), targets=(1.0,)), "2 attributes but 1 targets"),
    (dict(attributes=(), targets=()), "attributes must be a non-empty list"),
    (dict(attributes=("smiling",), targets=(1.0,), blend="skin"), "blend must be"),
])
def test_bad_values_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EditRequest(**kwargs)


def test_metrics_are_per_image_and_computed(models, faces):
    results, _ = run(models, faces[:2], [EditRequest(("smiling",), (1.0,)),
                                         EditRequest(("big_nose",), (0.0,))])
    for k, result in enumerate(results):
        m = result.metrics
        assert 0 <= m["prob_input"][next(iter(m["prob_input"]))] <= 1
        assert m["steps"] == 6 + 3 and m["seconds"] > 0
        assert m["preservation_l1"] >= 0 and m["recon_mse"] >= 0
        assert 0 <= m["region_portion_before"] <= 1 and 0 <= m["region_portion_after"] <= 1
        keep = 1 - result.masks["blend"]
        x = faces[k]
        want = (keep * (result.edited.clamp(0, 1) - x).abs()).sum() / (3 * keep.sum())
        assert m["preservation_l1"] == pytest.approx(want.item(), rel=1e-5)


def test_the_engine_runs_what_the_schedule_says_at_every_step(models, faces):
    overrides = {"steps.latent": 10, "steps.noise": 2, "loss.start_steps.classf": 3,
                 "loss.start_steps.seg": 5, "dynamic_masking_iters": 3}
    requests = [EditRequest(("wavy_hair",), (1.0,), size=1.1), EditRequest(("smiling",), (0.0,))]
    _, steps = run(models, faces[:2], requests, overrides)
    settings = EditConfig.from_overrides({**FEW_STEPS, **overrides}).resolve(["wavy_hair"])
    schedule = Schedule.for_group(settings, [0.5, 0.0], [1.1, 0.0])
    latent = [s for s in steps if s.phase == "latent"]
    assert [s.step for s in latent] == list(schedule.latent_range)
    for s in latent:                 # the terms the engine computed, not the ones it was told
        assert tuple(s.losses) == schedule.terms(s.step), s.step
    assert len(steps) == schedule.total_iterations


def first_difference(a, b) -> int | None:
    """The first latent step at which two runs' losses differ (None: they never do)."""
    for x, y in zip([s for s in a if s.phase == "latent"], [s for s in b if s.phase == "latent"]):
        if any(not torch.equal(x.losses[k], y.losses[k]) for k in x.losses):
            return x.step
    return None


@pytest.mark.parametrize("switch,step", [
    ({"optimizer.reinit": False}, 4),       # Adam re-created before step 3's update
    ({"dynamic_masking": False}, 6),        # masks grown after step 5's update
    ({"steps.noise": 0}, 8),                # noise redrawn before step 8's forward
])
def test_each_event_changes_the_numbers_exactly_where_the_schedule_puts_it(models, faces,
                                                                           switch, step):
    """Not the event labels the engine reports (the schedule's own), but their effect: a
    run without the event computes the same losses up to the step it would act on."""
    overrides = {"steps.latent": 10, "steps.noise": 2, "loss.start_steps.classf": 3,
                 "loss.start_steps.seg": 5, "dynamic_masking_iters": 3}
    request = [EditRequest(("black_hair",), (1.0,), size=1.1)]
    _, with_event = run(models, faces[:1], request, overrides)
    _, without = run(models, faces[:1], request, {**overrides, **switch})
    assert first_difference(with_event, without) == step


def test_a_network_the_edits_need_but_the_models_lack_is_a_setup_error(models, faces):
    local_only = copy.copy(models)
    local_only.lpips = None
    with pytest.raises(SetupError, match="lpips_trunk"):
        run(local_only, faces[:1], [EditRequest(("male",), (1.0,))])
    (result,), _ = run(local_only, faces[:1], [EditRequest(("smiling",), (1.0,))])
    assert result.ok


def test_an_edit_branched_from_the_shared_prefix_is_the_edit_from_scratch(m64, faces):
    """Float64. The prefix (3 recon-only steps here) runs once per image and recon mask;
    each edit branches at the classifier start. Same batch: the same numbers; a prefix
    computed in another batch: within 1e-5, as batching allows."""
    overrides = {"steps.latent": 5, "loss.start_steps.classf": 3, "loss.start_steps.seg": 3,
                 "dynamic_masking_iters": 1, "steps.noise": 1}
    config = EditConfig.from_overrides({**FEW_STEPS, **overrides})
    editor = Editor(m64, config)
    x = faces[:2].double()
    requests = [EditRequest(("smiling",), (1.0,), seed=1),
                EditRequest(("wavy_hair", "black_hair"), (1.0, 0.0), size=1.2, seed=2)]
    assert {shared_prefix(config.resolve(r.attributes)) for r in requests} == {3}
    scratch = editor.edit(x, requests)
    prefix = editor.invert(x, requests)
    branched = editor.edit(x, requests, start=StartPoint(latent=prefix, step=3))
    alone = torch.cat([editor.invert(x[k:k + 1], requests[k:k + 1]) for k in range(2)])
    torch.testing.assert_close(alone, prefix, rtol=0, atol=1e-5)
    for a, b in zip(scratch, branched):
        assert a.ok and b.ok
        torch.testing.assert_close(a.edited, b.edited, rtol=0, atol=1e-12)
        torch.testing.assert_close(a.latent, b.latent, rtol=0, atol=1e-12)
    # the prefix does not depend on the edit: another attribute, same recon mask
    other = editor.invert(x[:1], [EditRequest(("bushy_eyebrows",), (0.0,), seed=9)])
    torch.testing.assert_close(other[0], alone[0], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="share no single inversion prefix"):
        editor.invert(x[:1], [EditRequest(("male",), (1.0,))])


def test_early_stopping_retires_images_that_are_done_and_the_rest_go_on(models, faces):
    """Opt-in. Image 0 is aimed at the side the classifier already reports for the start
    image and the plateau test is loose, so it is done at the first decision and leaves;
    image 1 is aimed at the other side and runs every step, alone from then on."""
    g = models.generator
    with torch.no_grad():       # both start from the mean latent's image, and barely move
        start = g(models.mean_latent.view(1, 1, -1).repeat(1, g.n_latent, 1), g.make_noise(1))
        probs = torch.sigmoid(models.classifier(start))[0]
    # the local attribute the classifier is surest about; half that as the margin
    sure, name = max((abs(probs[ATTRIBUTE_INDEX[a]].item() - 0.5), a) for a in LOCAL_ATTRIBUTES)
    side = float(probs[ATTRIBUTE_INDEX[name]] >= 0.5)
    requests = [EditRequest((name,), (side,), seed=1), EditRequest((name,), (1 - side,), seed=2)]
    stop = {"steps.latent": 8, "loss.start_steps.classf": 2, "loss.start_steps.seg": 2,
            "dynamic_masking_iters": 2, "early_stop.enabled": True, "early_stop.margin": sure / 2,
            "early_stop.window": 1, "early_stop.every": 1, "early_stop.tolerance": 10.0}
    stopped, steps = run(models, faces[:2], requests, stop)
    full, _ = run(models, faces[:2], requests, {**stop, "early_stop.enabled": False})
    latent_rows = [s.rows for s in steps if s.phase == "latent"]
    assert latent_rows == [[0, 1]] * 6 + [[1]] * 2          # checks from step 4; leaves at 5
    assert stopped[0].metrics["steps"] == 6 + 3 and stopped[1].metrics["steps"] == 8 + 3
    assert all(r.ok and torch.isfinite(r.edited).all() for r in stopped)
    assert all(n.abs().sum() > 0 for n in stopped[0].noises)   # the noise phase ran for it
    torch.testing.assert_close(stopped[1].latent, full[1].latent, rtol=0, atol=1e-4)
    assert not torch.equal(stopped[0].latent, full[0].latent)
