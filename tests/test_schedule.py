"""The Schedule alone: what runs at each step, from the settings."""
from pipeline.engine.schedule import ADAM_REINIT, DYNAMIC_UPDATE, E4E_INIT, NOISE_REDRAW, Schedule
from pipeline.engine.settings import EditConfig


def test_the_papers_local_schedule():
    settings = EditConfig().resolve(["black_hair"])
    s = Schedule.for_group(settings, [settings.loss.weights.seg], [1.2])
    assert s.latent_range == range(0, 1000) and s.noise_iterations == 501
    assert s.total_iterations == 1501
    assert s.terms(0) == s.terms(499) == ("recon",)
    assert not s.parser_on(499)                         # the inversion prefix needs no parser
    assert s.terms(500) == ("recon", "classf", "seg", "size") == s.terms(999)
    assert s.events(500) == (ADAM_REINIT, DYNAMIC_UPDATE)
    assert [i for i in s.latent_range if DYNAMIC_UPDATE in s.events(i)] == list(range(500, 700))
    assert [i for i in s.latent_range if NOISE_REDRAW in s.events(i)] == [700]
    assert s.parser_on(999) and not s.dynamic_on(700)


def test_terms_follow_the_groups_weights_and_sizes():
    settings = EditConfig().resolve(["smiling"])            # no hair: seg weight 0
    s = Schedule.for_group(settings, [settings.loss.weights.seg], [0.0])
    assert s.terms(600) == ("recon", "classf") and s.parser_on(600)   # dynamic masking only
    assert not s.parser_on(800)
    off = EditConfig.from_overrides({"loss.weights.classf": 0}).resolve(["smiling"])
    assert "classf" not in Schedule.for_group(off).terms(900)
    assert ADAM_REINIT in Schedule.for_group(off).events(500)     # re-init still at its step


def test_the_global_schedule_starts_from_e4e():
    settings = EditConfig().resolve(["male"])
    s = Schedule.for_group(settings)
    assert s.from_e4e and s.latent_range == range(300, 1000)
    assert s.events(300) == (E4E_INIT,) and s.terms(300) == ("recon", "classf")
    assert not any(DYNAMIC_UPDATE in s.events(i) or ADAM_REINIT in s.events(i)
                   for i in s.latent_range)
    assert s.total_iterations == 700 + 501
    given = Schedule.for_group(settings, given_latent=True, start_step=0)
    assert not given.from_e4e and given.start == 0 and E4E_INIT not in given.events(0)


def test_noise_phase_off_and_a_start_past_the_end():
    settings = EditConfig.from_overrides({"steps.noise": 0}).resolve(["smiling"])
    s = Schedule.for_group(settings, start_step=1000)
    assert s.noise_iterations == 0 and s.total_iterations == 0
    assert not any(NOISE_REDRAW in s.events(i) for i in range(1000))


def test_the_shared_prefix_ends_where_adam_restarts():
    from pipeline.engine.schedule import shared_prefix
    config = EditConfig()
    assert shared_prefix(config.resolve(["smiling"])) == 500
    assert shared_prefix(config.resolve(["wavy_hair"])) == 500
    assert shared_prefix(config.resolve(["male"])) == 0                     # global: e4e
    assert shared_prefix(EditConfig.from_overrides({"e4e_init": True}).resolve(["smiling"])) == 0
    no_reinit = EditConfig.from_overrides({"optimizer.reinit": False})
    assert shared_prefix(no_reinit.resolve(["smiling"])) == 0                # Adam would cross
    seg_first = EditConfig.from_overrides({"loss.start_steps.seg": 300})
    assert shared_prefix(seg_first.resolve(["smiling"])) == 0
    later = EditConfig.from_overrides({"loss.start_steps.seg": 600})
    assert shared_prefix(later.resolve(["smiling"])) == 500
    s = Schedule.for_group(config.resolve(["black_hair"]), [0.5], [1.0])
    assert all(s.terms(i) == ("recon",) and not s.events(i) and not s.parser_on(i)
               for i in range(500))
