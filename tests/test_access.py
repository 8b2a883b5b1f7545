"""The inputs rule and the output prefix: what a manifest's URIs may make a job read or
write. Without inputs.allow, only under the manifest's folder and the roots it records;
`[any]` opts out; a list confines. (The Ray jobs that prove nothing refused is read are
in tests/test_reliability.py.)"""
import json
import logging
import os

import pandas as pd
import pyarrow as pa
import pytest

from jobs.run import load_job_spec
from manifests.schema import read_manifest, write_manifest
from pipeline.errors import InputRefused
from pipeline.output.layout import Output
from pipeline.runner.access import (INPUT_ROOTS_KEY, InputPolicy, manifest_folder,
                                    recorded_roots, roots_metadata)


def refused(policy, uri):
    with pytest.raises(InputRefused) as err:
        policy.check(uri)
    return str(err.value)


def built(tmp_path, roots=(), name="in"):
    """A manifest folder `name` with a manifest recording `roots` (as a builder does), and
    the policy a job on it checks with: the default's folders resolved from the file."""
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    rows = pd.DataFrame({"id": ["a"], "image_uri": ["a.png"], "attributes": [["smiling"]],
                         "targets": [[1.0]]})
    write_manifest(rows, str(folder / "m.parquet"), input_roots=[str(r) for r in roots])
    schema = read_manifest(str(folder / "m.parquet")).schema
    return InputPolicy().for_manifest(str(folder / "m.parquet"), schema)


def test_the_default_reads_only_under_the_manifests_folder_and_the_roots_it_records(tmp_path):
    """The four ways out of a manifest's folder (a symlink, `..`, an absolute path,
    file://) each fail with the rule named; so does any other s3:// object and any
    other protocol. (tests/test_reliability.py runs them through a job: nothing read.)"""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "photo.png").write_bytes(b"x")
    photos = tmp_path / "photos"
    photos.mkdir()
    policy = built(tmp_path, [photos, "s3://data/faces"])
    inside = tmp_path / "in"
    os.symlink(tmp_path / "elsewhere" / "photo.png", inside / "link.png")
    for ok in (str(inside / "a.png"), str(inside / "sub" / "b.png"), f"file://{inside}/a.png",
               str(photos / "c.png"), f"{photos}/../photos/c.png", "s3://data/faces/x/a.png",
               f"{tmp_path}/.cache/../in/a.png"):
        policy.check(ok)
    rule = (f"refused: outside the manifest's folder {inside} and the roots it records "
            f"({photos}, s3://data/faces/); list it in inputs.allow")
    for uri in (str(inside / "link.png"),                           # a symlink out
                f"{inside}/../elsewhere/photo.png",                 # ..
                str(tmp_path / "elsewhere" / "photo.png"),          # an absolute path
                f"file://{tmp_path}/elsewhere/photo.png",           # file://
                f"{photos}2/c.png", str(tmp_path / "m.parquet"),
                "s3://data/faces2/a.png", "s3://data/a.png", "s3://other/faces/a.png"):
        assert refused(policy, uri) == f"{uri}: {rule}"
    for uri, words in [
        ("http://127.0.0.1:8000/a.png", "http:// inputs must be listed in inputs.allow"),
        ("https://169.254.169.254/latest/meta-data/", "https:// inputs must be listed"),
        ("gs://bucket/a.png", "gs:// inputs must be listed"),
        ("memory://a.png", "memory:// inputs must be listed"),
        ("simplecache::s3://data/faces/a.png", "chained protocols"),
        ("data:image/png;base64,iVBORw0KGgo=", "data: URIs are not accepted"),
        ("s3://data/faces/../private/a.png", "'..' path segments are not accepted"),
    ]:
        text = refused(policy, uri)
        assert words in text and "refused" in text, (uri, text)
    assert policy.describe() == (f"inputs: reading only under the manifest's folder {inside} "
                                 f"and the roots it records ({photos}, s3://data/faces/), "
                                 "never hidden files or system folders (inputs.allow unset)")
    alone = built(tmp_path, name="alone")
    assert refused(alone, str(photos / "c.png")).endswith(
        f"outside the manifest's folder {tmp_path / 'alone'} (it records no other roots); "
        "list it in inputs.allow")


def test_hidden_files_and_system_folders_stay_refused_inside_the_manifests_folders(
        tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))                 # the manifest lies in a home
    policy = built(home, ["/etc", "/proc"], name="")
    policy.check(str(home / "photos" / "a.png"))
    hidden = "a path inside a hidden folder of a home directory"
    for uri, words in [(str(home / ".aws" / "credentials"), hidden),
                       (str(home / ".ray" / "auth_token"), hidden),
                       (str(home / "photos" / ".env"), "a hidden file"),
                       ("/etc/shadow", "a path inside a system folder"),
                       ("/proc/self/environ", "a path inside a system folder")]:
        assert refused(policy, uri) == (f"{uri}: refused: {words} (the default rule refuses it "
                                        "even under the manifest's folders; list it in "
                                        "inputs.allow)")


def test_the_roots_a_manifest_records_are_data(tmp_path, caplog):
    """What a manifest records is checked as its rows are: an entry that is no local folder
    or s3:// prefix, or the whole filesystem, is left out and said; so is a value that is
    no JSON list. The folders it keeps are normalised (resolved, s3 with its slash)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for bad in (["http://images.example.com/"], ["/"], ["a::b"], ["file:///"]):
        with pytest.raises(ValueError):
            roots_metadata(bad)
    schema = pa.schema([("id", pa.string())])
    raw = json.dumps([f"{photos}/../photos", "s3://data/faces", "/", "https://h/x/",
                      "gs://bucket/x/", "s3://data/faces/"]).encode()
    with caplog.at_level(logging.WARNING, logger="pipeline.runner.access"):
        roots = recorded_roots(schema.with_metadata({INPUT_ROOTS_KEY: raw}))
        assert roots == (str(photos), "s3://data/faces/")
        assert len(caplog.records) == 3 and all(
            "a root the manifest records is ignored" in r.getMessage() for r in caplog.records)
        caplog.clear()
        for junk in (b"not json", b'{"a": 1}', b'["/x", 3]'):
            assert recorded_roots(schema.with_metadata({INPUT_ROOTS_KEY: junk})) == ()
        assert len(caplog.records) == 3 and all(
            "is not a JSON list of folder URIs: ignored" in r.getMessage()
            for r in caplog.records)
    assert recorded_roots(schema) == () and recorded_roots(None) == ()
    assert roots_metadata([photos, f"{photos}/", "s3://data/faces"]) == {
        INPUT_ROOTS_KEY: json.dumps([str(photos), "s3://data/faces/"]).encode()}


def test_a_manifest_on_s3_reads_its_own_prefix_and_the_roots_it_records(s3_server):
    fs, options = s3_server["fs"], s3_server["options"]
    fs.mkdir("access")
    rows = pd.DataFrame({"id": ["a"], "image_uri": ["x.png"], "attributes": [["smiling"]],
                         "targets": [[1.0]]})
    write_manifest(rows, "s3://access/manifests/m.parquet", options,
                   input_roots=["s3://access/images"])
    manifest = read_manifest("s3://access/manifests/m.parquet", options)
    policy = InputPolicy().for_manifest("s3://access/manifests/m.parquet", manifest.schema)
    for ok in ("s3://access/images/a.png", "s3://access/images/sub/b.png",
               "s3://access/manifests/x.png", manifest.rows["image_uri"].iloc[0]):
        policy.check(ok)
    for uri in ("s3://access/private/a.png", "s3://access/images2/a.png", "s3://access/a.png",
                "s3://other/images/a.png", "/tmp/a.png"):
        assert refused(policy, uri).endswith(
            "refused: outside the manifest's folder s3://access/manifests/ and the roots it "
            "records (s3://access/images/); list it in inputs.allow")
    assert manifest_folder("s3://access/m.parquet") == "s3://access/"
    assert manifest_folder("s3://access/shards/") == "s3://access/shards/"


def test_inputs_allow_any_opts_out_and_says_so(tmp_path):
    """`[any]`: the rule before the manifest's folders (any local file or s3:// object but
    hidden and system ones); http(s) still only when listed beside it."""
    (tmp_path / "elsewhere").mkdir()
    spec = load_job_spec(str(_spec(tmp_path)), ["inputs.allow=[any]"])
    policy = spec.inputs.for_manifest(str(tmp_path / "in" / "m.parquet"), None)
    assert policy is spec.inputs and policy.allow == ("any",) and policy.allows_any
    assert spec.as_dict()["inputs"]["allow"] == ["any"]               # job.json says it
    for ok in (str(tmp_path / "elsewhere" / "a.png"), f"file://{tmp_path}/x/../a.png",
               "s3://anything/a.png", f"{tmp_path}/.cache/a.png"):
        policy.check(ok)
    for uri, words in [
        ("http://127.0.0.1:8000/a.png", "http:// inputs must be listed in inputs.allow"),
        (os.path.expanduser("~/.aws/credentials"), "inside a hidden folder of a home"),
        ("/root/.ssh/id_ed25519", "inside a hidden folder of a home"),
        (f"{tmp_path}/.env", "a hidden file"),
        ("/etc/shadow", "a path inside a system folder"),
        (f"{tmp_path}/faces/" + "../" * 30 + "etc/passwd", "a path inside a system folder"),
    ]:
        text = refused(policy, uri)
        assert words in text and "(inputs.allow: [any] reads any local file but hidden" in text
    assert policy.describe().startswith("inputs.allow: [any]: this job may read any local file")
    both = InputPolicy.from_spec({"allow": [" ANY ", "http://127.0.0.1:8000/pub/"]})
    assert both.allow == ("any", "http://127.0.0.1:8000/pub/") and both.allows_any
    both.check("http://127.0.0.1:8000/pub/a.png")
    assert "http:// inputs must be listed" in refused(both, "http://127.0.0.1:8000/a.png")
    assert not InputPolicy.from_spec({"allow": ["./any"]}).allows_any   # a folder named any
    listed = InputPolicy.from_spec({"allow": [str(tmp_path)]})
    assert listed.for_manifest("/elsewhere/m.parquet", None) is listed
    assert not listed.allows_any and listed.describe() == (
        f"inputs: reading only under inputs.allow: {tmp_path}")


def _spec(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("manifest: in/m.parquet\noutput: out\nmodels: m.yaml\n")
    return path


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
