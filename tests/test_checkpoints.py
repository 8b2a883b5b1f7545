import argparse
import hashlib

import pytest
import torch

from helpers import PlantsAMarker, read_listing, shapes_of
from models.checkpoints import CheckpointError, cache_dir, local_file, sha256_file
from models.classifier import ATTRIBUTES, BranchedTiny
from models.e4e import Encoder4Editing
from models.face_parser import FaceParser
from models.loaders import (load_classifier, load_e4e, load_face_parser, load_generator,
                            load_lpips)
from models.spec import WeightRef

LOADERS = {
    "generator": (load_generator, "stylegan2.pt", lambda c: c["g_ema"]),
    "face_parser": (load_face_parser, "face_parser.pt", lambda c: c),
    "classifier": (load_classifier, "classifier.pt", lambda c: c),
    "e4e": (load_e4e, "e4e.pt", lambda c: c["encoder_state_dict"]),
    "lpips_trunk": (load_lpips, "vgg16_features.pth", lambda c: c),
}


def raw(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", list(LOADERS))
def test_each_model_round_trips_through_its_file_format(tiny_dir, name):
    loader, file, state_of = LOADERS[name]
    loaded = loader(WeightRef(str(tiny_dir / file)))
    assert loaded.sha256 == sha256_file(tiny_dir / file)
    on_disk = dict(state_of(raw(tiny_dir / file)))
    on_disk.pop("loss.weight", None)
    module = loaded.module
    if name == "e4e":
        module = module.encoder
    if name == "lpips_trunk":
        module, on_disk = module.features, {k.removeprefix("features."): v
                                            for k, v in on_disk.items()}
    state = module.state_dict()
    assert state.keys() == on_disk.keys()
    for key, value in on_disk.items():
        assert torch.equal(state[key], value), key
    assert not any(p.requires_grad for p in loaded.module.parameters())
    assert not loaded.module.training


def corrupt(tmp_path, tiny_dir, name, edit):
    loader, file, state_of = LOADERS[name]
    ckpt = raw(tiny_dir / file)
    edit(state_of(ckpt))
    path = tmp_path / file
    torch.save(ckpt, path)
    return lambda: loader(WeightRef(str(path)))


def last_key(sd):
    """A key the width inference does not read, so the strict check is what fails."""
    return [k for k in sd if k != "loss.weight"][-1]


@pytest.mark.parametrize("name", list(LOADERS))
def test_a_missing_key_is_rejected(tmp_path, tiny_dir, name):
    load = corrupt(tmp_path, tiny_dir, name, lambda sd: sd.pop(last_key(sd)))
    with pytest.raises(CheckpointError, match="1 missing keys"):
        load()


@pytest.mark.parametrize("name", list(LOADERS))
def test_an_extra_key_is_rejected(tmp_path, tiny_dir, name):
    prefix = "features." if name == "lpips_trunk" else ""
    load = corrupt(tmp_path, tiny_dir, name,
                   lambda sd: sd.__setitem__(prefix + "99.extra.weight", torch.zeros(1)))
    with pytest.raises(CheckpointError, match=r"unexpected keys: 99\.extra\.weight"):
        load()


@pytest.mark.parametrize("name", ["generator", "face_parser", "classifier", "e4e"])
def test_a_wrong_shape_is_rejected(tmp_path, tiny_dir, name):
    def edit(sd):
        # a conv weight far from the width-inferring keys, so inference still succeeds
        key = [k for k, v in sd.items() if v.ndim >= 4 and k.endswith("weight")][-1]
        sd[key] = torch.zeros(*sd[key].shape[:-1], sd[key].shape[-1] + 1)
    load = corrupt(tmp_path, tiny_dir, name, edit)
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load()


def test_face_parser_needs_and_drops_loss_weight(tmp_path, tiny_dir):
    load = corrupt(tmp_path, tiny_dir, "face_parser", lambda sd: sd.pop("loss.weight"))
    with pytest.raises(CheckpointError, match="loss.weight"):
        load()


@pytest.mark.parametrize("listing,build", [
    ("attribute_classifier_state.tsv", lambda: BranchedTiny(width=64)),
    ("face_parser_state.tsv", lambda: FaceParser(working_size=512)),
])
def test_full_width_keys_and_shapes_match_the_original(listing, build):
    want = read_listing(listing)
    got = shapes_of(build().state_dict())
    if listing.startswith("face_parser"):
        want = [row for row in want if row[0] != "loss.weight"]
    assert got == want


@pytest.mark.slow
def test_full_width_e4e_keys_and_shapes_match_the_original():
    assert shapes_of(Encoder4Editing(stylegan_size=1024).state_dict()) == \
        read_listing("e4e_encoder_state_dict_1024.tsv")


def test_classifier_names_forty_attributes():
    assert len(ATTRIBUTES) == len(set(ATTRIBUTES)) == 40
    x = torch.rand(2, 3, 64, 64)
    assert BranchedTiny(width=8, fc_width=16).eval()(x).shape == (2, 40)


def test_sha256_mismatch_names_the_file(tiny_dir):
    path = tiny_dir / "classifier.pt"
    with pytest.raises(CheckpointError, match=r"classifier\.pt: sha256 mismatch: expected 0{64}"):
        load_classifier(WeightRef(str(path), sha256="0" * 64))
    assert load_classifier(WeightRef(str(path), sha256=sha256_file(path))).sha256


def test_a_pickle_carrying_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({"g_ema": {"style.1.weight": torch.zeros(1)}, "x": PlantsAMarker(marker)}, evil)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused to load.*system"):
        load_generator(WeightRef(str(evil)))
    assert not marker.exists()


def test_e4e_options_of_another_type_are_refused(tmp_path, tiny_dir):
    ckpt = raw(tiny_dir / "e4e.pt")
    ckpt["options"] = PlantsAMarker(tmp_path / "marker")
    torch.save(ckpt, tmp_path / "e4e.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_e4e(WeightRef(str(tmp_path / "e4e.pt")))
    assert not (tmp_path / "marker").exists()


def test_truncated_foreign_and_missing_files(tmp_path, tiny_dir):
    data = (tiny_dir / "classifier.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt: not a readable PyTorch checkpoint"):
        load_classifier(WeightRef(str(tmp_path / "cut.pt")))
    (tmp_path / "notes.pt").write_text("hello, not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes\.pt: not a readable PyTorch checkpoint"):
        load_classifier(WeightRef(str(tmp_path / "notes.pt")))
    with pytest.raises(CheckpointError, match=r"absent\.pt: file not found"):
        load_classifier(WeightRef(str(tmp_path / "absent.pt")))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_generator(WeightRef(str(tmp_path / "list.pt")))


def test_remote_checkpoints_are_copied_once_into_the_node_cache(s3_server, tiny_dir):
    fs = s3_server["fs"]
    fs.put_file(str(tiny_dir / "classifier.pt"), "weights/remote/classifier.pt")
    uri = "s3://weights/remote/classifier.pt"
    sha = sha256_file(tiny_dir / "classifier.pt")
    opts = s3_server["options"]
    path = local_file(uri, sha, opts)
    assert path.is_relative_to(cache_dir()) and sha256_file(path) == sha
    fs.rm(uri)          # the cached copy now serves on its own
    loaded = load_classifier(WeightRef(uri, sha), storage_options=opts)
    assert loaded.sha256 == sha
    with pytest.raises(CheckpointError, match="file not found"):
        local_file("s3://weights/remote/absent.pt", None, opts)


def test_a_remote_file_with_the_wrong_hash_is_not_cached(s3_server, tiny_dir):
    fs = s3_server["fs"]
    fs.put_file(str(tiny_dir / "classifier.pt"), "weights/bad/classifier.pt")
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        local_file("s3://weights/bad/classifier.pt", "f" * 64, s3_server["options"])
    key = hashlib.sha256(b"s3://weights/bad/classifier.pt").hexdigest()[:16]
    folder = cache_dir() / "files" / key
    assert folder.is_dir()
    assert not [p for p in folder.iterdir() if not p.name.endswith(".lock")]


def test_lpips_without_a_trunk_says_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="maskface weights fetch --only lpips_trunk"):
        load_lpips(None)
