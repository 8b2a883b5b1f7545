import pytest

from jobs.options import parse_set, read_overrides
from pipeline.engine.settings import SCHEMA, ConfigError, EditConfig, EditSettings, StepSettings

ORIGINAL_CONFIG_YML = """
optimizer: {lr_latent: 0.001, lr_noise: 0.1, reinit: true}
steps: {latent: 1000, noise: 500, log: 100}
models: {update_shape: false}
loss:
  weights: {classf: 0.005, mse: 2, seg: 0.5, n_loss: 1, size: 1, lpips: 0.03}
  start_steps: {classf: 500, mse: 0, seg: 500, n_loss: 0}
dynamic_masking: true
dynamic_masking_iters: 200
"""


def test_defaults_equal_the_originals_config_yml():
    assert EditConfig.from_overrides(read_overrides(ORIGINAL_CONFIG_YML)).base == EditConfig.from_overrides().base
    cfg = EditConfig.from_overrides().base
    assert cfg.smoothing == 0.05 and cfg.e4e_start_step == 300
    assert cfg.blend == "include_skin" and cfg.parser_size == 512 and cfg.mode == "auto"
    assert cfg.steps.latent == 1000 and cfg.loss.weights.classf == 0.005
    assert cfg.as_dict()["loss.start_steps.seg"] == 500 and list(cfg.as_dict()) == list(SCHEMA)


def test_nested_and_dotted_overrides_agree():
    nested = EditConfig.from_overrides(
        read_overrides("steps: {latent: 50}\nloss: {weights: {seg: 0.25}}")).base
    dotted = EditConfig.from_overrides(parse_set(["steps.latent=50", "loss.weights.seg=0.25"])).base
    assert nested == dotted
    assert nested.steps.latent == 50 and nested.loss.weights.seg == 0.25
    assert EditConfig.from_overrides(parse_set(["dynamic_masking=false"])).base.dynamic_masking is False


@pytest.mark.parametrize("overrides,message", [
    ({"steps.latnt": 5}, "unknown edit setting.*steps.latnt"),
    ({"steps": {"latent": -1}}, "steps.latent: value -1 is out of range"),
    ({"optimizer.lr_latent": "fast"}, "expected a number"),
    ({"dynamic_masking": "maybe"}, "expected true or false"),
    ({"blend": "everything"}, "blend: value 'everything' is out of range"),
    ({"mode": "both"}, "mode"),
    ({"smoothing": 1.5}, "smoothing"),
    ({"e4e_init": True, "steps.latent": 200}, r"e4e_start_step \(300\) must be below steps.latent"),
])
def test_bad_settings_are_rejected_with_the_reason(overrides, message):
    with pytest.raises(ConfigError, match=message):
        EditConfig.from_overrides(overrides)


def test_derived_settings_per_mode_and_the_users_keys_win():
    cfg = EditConfig.from_overrides()
    local = cfg.resolve(["smiling"])
    assert local.mode == "local" and local.local and local.loss.weights.seg == 0
    assert local.optimizer.reinit and local.dynamic_masking and not local.e4e_init
    hair = cfg.resolve(["wavy_hair"])
    assert hair.loss.weights.seg == 0.5 and hair.models.update_shape
    glob = cfg.resolve(["male"])
    assert glob.mode == "global" and glob.e4e_init and glob.loss.start_steps.classf == 0
    assert not glob.optimizer.reinit and not glob.dynamic_masking
    # multi-attribute rows: any global attribute makes the row global; hair turns seg on
    mixed = cfg.resolve(["smiling", "black_hair", "young"])
    assert mixed.mode == "global" and mixed.loss.weights.seg == 0.5
    assert cfg.resolve(["male"], mode="local").mode == "local"
    user = EditConfig.from_overrides({"loss.weights.seg": 0.1, "dynamic_masking": True})
    assert user.resolve(["smiling"]).loss.weights.seg == 0.1
    assert user.resolve(["male"]).dynamic_masking is True
    with pytest.raises(ConfigError, match="e4e_start_step"):
        EditConfig.from_overrides({"steps.latent": 100}).resolve(["male"])


def test_a_misspelt_or_missing_setting_fails_before_any_step():
    settings = EditConfig().resolve(["smiling"])
    with pytest.raises(AttributeError):
        settings.steps.latnt                                    # noqa: B018
    with pytest.raises(TypeError):
        EditSettings(steps=StepSettings(latent=5), bogus=1)         # type: ignore[call-arg]
    assert set(k for k, info in SCHEMA.items() if info.per_image) == {
        "loss.weights.seg", "models.update_shape"}
    hair, plain = EditConfig().resolve(["black_hair"]), settings
    assert hair.group_key() == plain.group_key() and hair != plain   # one batch, two images
