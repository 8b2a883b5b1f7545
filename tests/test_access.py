"""The inputs allow-list and the output prefix: what a manifest's URIs may make a job read
or write (the Ray job that proves no request is made is in tests/test_reliability.py)."""
import os

import pytest

from pipeline.errors import InputRefused
from pipeline.output.layout import Output
from pipeline.runner.access import InputPolicy


def refused(policy, uri):
    with pytest.raises(InputRefused) as err:
        policy.check(uri)
    return str(err.value)


def test_the_default_allows_local_data_and_s3_but_no_other_protocol(tmp_path):
    default = InputPolicy()
    for ok in (str(tmp_path / "faces" / "a.png"), f"file://{tmp_path}/a.png", "s3://data/x/a.png",
               "relative/photo.png"):
        default.check(ok)
    for uri, words in [
        ("http://127.0.0.1:8000/a.png", "http:// inputs must be listed in inputs.allow"),
        ("https://169.254.169.254/latest/meta-data/", "https:// inputs must be listed"),
        ("gs://bucket/a.png", "gs:// inputs must be listed"),
        ("memory://a.png", "memory:// inputs must be listed"),
        (os.path.expanduser("~/.aws/credentials"), "inside a hidden folder of a home"),
        (os.path.expanduser("~/.ray/auth_token"), "inside a hidden folder of a home"),
        ("/root/.ssh/id_ed25519", "inside a hidden folder of a home"),
        (f"{tmp_path}/.env", "a hidden file"),
        ("/etc/shadow", "a path inside a system folder"),
        ("/proc/self/environ", "a path inside a system folder"),
        (f"{tmp_path}/faces/" + "../" * 30 + "etc/passwd", "a path inside a system folder"),
        ("simplecache::s3://data/a.png", "chained protocols"),
        ("data:image/png;base64,iVBORw0KGgo=", "data: URIs are not accepted"),
    ]:
        text = refused(default, uri)
        assert words in text and "refused" in text, (uri, text)
    assert "(the default rule allows local files but hidden ones" in \
        refused(default, "http://127.0.0.1/a.png")
    default.check(f"{tmp_path}/.cache/photos/a.png")     # a hidden folder outside any home


def test_an_allow_list_confines_inputs_to_its_folders(tmp_path):
    data = tmp_path / "data"
    (data / "faces").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key.png").write_bytes(b"x")
    os.symlink(tmp_path / "secret" / "key.png", data / "faces" / "link.png")
    policy = InputPolicy.from_spec({"allow": [str(data), "s3://bucket/faces/",
                                              "https://images.example.com:8443/pub"]})
    for ok in (str(data / "faces" / "a.png"), f"file://{data}/b.png", "s3://bucket/faces/x/a.png",
               "https://images.example.com:8443/pub/a.png",
               "https://IMAGES.example.com:8443/pub/a.png?sig=1"):
        policy.check(ok)
    for uri in (str(tmp_path / "secret" / "key.png"),
                str(data / "faces" / "link.png"),              # a symlink out of the folder
                f"{data}/../secret/key.png",                   # .. out of the folder
                f"{data}2/a.png",                              # a sibling with the same prefix
                "s3://bucket/faces2/a.png", "s3://bucket/faces/../private/a.png",
                "s3://other/faces/a.png",
                "https://images.example.com/pub/a.png",        # another port
                "http://images.example.com:8443/pub/a.png",    # another scheme
                "https://images.example.com:8443/private/a.png",
                "https://images.example.com:8443/pub/%2e%2e/private/a.png",
                "https://images.example.com:8443@127.0.0.1/pub/a.png",   # userinfo trick
                "https://user:pw@images.example.com:8443/pub/a.png"):
        text = refused(policy, uri)
        assert "refused" in text
    assert "pw@" not in refused(policy, "https://user:pw@images.example.com:8443/pub/a.png")
    assert "not under any inputs.allow prefix" in refused(policy, "s3://other/faces/a.png")


@pytest.mark.parametrize("spec,words", [
    ({"allow": "s3://x/"}, None),
    ({"allow": [1]}, "inputs.allow must be a list of URI prefixes"),
    ({"allow": ["a::b"]}, "chained protocols"),
    ({"max_bytes": 0}, "inputs.max_bytes must be a positive integer"),
    ({"square": "pad"}, "inputs.square must be one of crop, stretch"),
    ({"allowed": ["x"]}, r"unknown key\(s\) \['allowed'\]"),
])
def test_the_inputs_section_is_checked(spec, words):
    if words is None:
        assert InputPolicy.from_spec(spec).allow == ("s3://x/",)
        return
    with pytest.raises(ValueError, match=words):
        InputPolicy.from_spec(spec)


def test_outputs_stay_under_the_output_prefix(tmp_path):
    out = Output(str(tmp_path / "out"))
    for rel in ("../escape.png", "/etc/x", "images/../../x", "images//x", "a\\..\\b"):
        with pytest.raises(ValueError, match="would leave the output folder"):
            out.put(rel, b"x")
    with pytest.raises(ValueError):
        out.put_row_file("images", "../x", b"x")
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "out").exists()
