import pytest
import yaml

from models.spec import ModelsSpec, SpecError, read_spec, write_spec


def base(**extra):
    data = {"generator": {"uri": "g.pt"}, "face_parser": {"uri": "p.pt"},
            "classifier": "c.pt"}
    data.update(extra)
    return data


def test_relative_uris_resolve_against_the_spec(tmp_path):
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(base(e4e={"uri": "s3://b/e4e.pt"})))
    spec = read_spec(str(tmp_path / "models.yaml"))
    assert spec.generator.uri == str(tmp_path / "g.pt")
    assert spec.classifier.uri == str(tmp_path / "c.pt")
    assert spec.e4e.uri == "s3://b/e4e.pt"
    assert spec.lpips_trunk is None and spec.tiny is False
    assert spec.mean_latent.samples == 50_000 and spec.mean_latent.source == "computed"


@pytest.mark.parametrize("data,message", [
    (base(extra_model={"uri": "x"}), r"unknown key\(s\) in models spec: \['extra_model'\]"),
    ({"generator": "g.pt", "classifier": "c.pt"}, "names no face_parser"),
    (base(e4e={"uri": "e.pt", "md5": "x"}), r"e4e: unknown key\(s\) \['md5'\]"),
    (base(e4e={"path": "e.pt"}), "e4e: expected"),
    (base(e4e={"uri": "e.pt", "sha256": "abc"}), "sha256 must be 64 hex digits"),
    (base(mean_latent={"source": "magic"}), "mean_latent.source"),
    (base(mean_latent={"samples": 0}), "mean_latent.samples"),
    (base(mean_latent={"n": 5}), r"mean_latent: unknown key\(s\) \['n'\]"),
])
def test_bad_specs_are_rejected_with_the_reason(data, message):
    with pytest.raises(SpecError, match=message):
        ModelsSpec.from_dict(data)


def test_spec_round_trips_and_errors_name_the_file(tmp_path):
    spec = ModelsSpec.from_dict(base(tiny=True, mean_latent={"seed": 3}))
    write_spec(spec, str(tmp_path / "m.yaml"), header="hello")
    assert (tmp_path / "m.yaml").read_text().startswith("# hello\n")
    again = ModelsSpec.from_dict(yaml.safe_load((tmp_path / "m.yaml").read_text()))
    assert again == spec
    (tmp_path / "bad.yaml").write_text("generator: [")
    with pytest.raises(SpecError, match=r"bad\.yaml: not valid YAML"):
        read_spec(str(tmp_path / "bad.yaml"))
    with pytest.raises(SpecError, match="not found"):
        read_spec(str(tmp_path / "none.yaml"))
