import argparse
import dataclasses
import hashlib
import io
import logging
import re
import sys
import time
import uuid
import zipfile

import pytest
import torch

from helpers import PlantsAMarker, read_listing, shapes_of
from models.check import preflight
from models.checkpoints import CheckpointError, cache_dir, local_file, safe_load, sha256_file
from models.classifier import ATTRIBUTES, BranchedTiny
from models.e4e import Encoder4Editing
from models.face_parser import FaceParser
from models.loaders import (load_classifier, load_e4e, load_face_parser, load_generator,
                            load_judge, load_lpips, load_models)
from models.spec import NETWORKS, REQUIRED, MeanLatent, ModelsSpec, WeightRef, read_spec
from models.tiny import FILES, resnet50_judge_state, tiny_generator
from nvidia_pickles import official_networks, pickle_bytes, random_generator_state
from pipeline.errors import MAX_MESSAGE, SetupError

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


# The preflight (models/check.py): every file a job needs, checked before any actor starts.

def tiny_spec(tiny_dir, **refs) -> ModelsSpec:
    """The tiny spec (its files in place, each sha256 pinned), with `refs` (network ->
    path, URI or WeightRef) in place of some of its entries."""
    spec = read_spec(str(tiny_dir / "models.yaml"))
    return dataclasses.replace(spec, **{n: r if isinstance(r, WeightRef) else WeightRef(str(r))
                                        for n, r in refs.items()})


def refused(spec, networks=NETWORKS, storage_options=None) -> str:
    """The line `preflight` refuses `spec` with: a CheckpointError that is a SetupError,
    one line under MAX_MESSAGE bytes, raised within seconds."""
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as err:
        preflight(spec, networks, storage_options)
    seconds = time.perf_counter() - start
    message = str(err.value)
    assert isinstance(err.value, SetupError)
    assert "\n" not in message and len(message.encode()) < MAX_MESSAGE, message[:300]
    assert seconds < 15, f"refused after {seconds:.1f} s"
    return message


def test_preflight_passes_a_good_spec_and_returns_each_files_sha256(tiny_dir, caplog):
    spec = read_spec(str(tiny_dir / "models.yaml"))
    with caplog.at_level(logging.INFO, logger="models.check"):
        start = time.perf_counter()
        hashes = preflight(spec, NETWORKS)
        seconds = time.perf_counter() - start
    assert hashes == {n: sha256_file(tiny_dir / FILES[n]) for n in NETWORKS}
    assert seconds < 15, seconds
    lines = [r.getMessage() for r in caplog.records if r.name == "models.check"]
    assert [line.split()[2] for line in lines] == list(NETWORKS)    # one line each, in order
    for line, name in zip(lines, NETWORKS):
        assert re.search(rf"{re.escape(str(tiny_dir / FILES[name]))} \(sha256 "
                         rf"{hashes[name][:16]}, \d+\.\d\d s\)$", line), line
    # only what the job needs: a local-mode job's actors read no e4e, LPIPS trunk or judge
    assert preflight(spec, REQUIRED) == {n: hashes[n] for n in REQUIRED}
    # no sha256 in the spec: each hash is computed from the file, not copied from the spec
    bare = dataclasses.replace(spec, **{n: WeightRef(getattr(spec, n).uri) for n in NETWORKS})
    assert preflight(bare, NETWORKS) == hashes


def _malicious_generator(tiny_dir, marker) -> bytes:
    buf = io.BytesIO()
    torch.save({"g_ema": raw(tiny_dir / "stylegan2.pt")["g_ema"], "x": PlantsAMarker(marker)}, buf)
    return buf.getvalue()


def _malicious_e4e_options(tiny_dir, marker) -> bytes:
    """e4e's options are the one non-tensor a checkpoint may hold: here they run code."""
    ckpt = raw(tiny_dir / "e4e.pt")
    ckpt["options"] = PlantsAMarker(marker, via="eval")
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def _a_tensor_cut_short(tiny_dir, marker) -> bytes:
    """The judge's zip whole, its directory right, but its largest tensor's bytes halved."""
    src, buf = zipfile.ZipFile(tiny_dir / "judge.pt"), io.BytesIO()
    largest = max((i for i in src.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as out:
        for item in src.infolist():
            data = src.read(item)
            out.writestr(item.filename, data[:len(data) // 2] if item == largest else data)
    return buf.getvalue()


def _nvidia_pickle(tiny_dir, marker) -> bytes:
    """NVIDIA's original generator format: the loaders need it converted first."""
    sd = random_generator_state(tiny_generator(32, 64))
    return pickle_bytes(official_networks(sd, torch.zeros(64)))


# kind -> (network, file name, its bytes (None: absent), the reason the line must give)
BAD_FILES = {
    "missing": ("generator", "no_such_generator.pt", None, "file not found$"),
    "truncated": ("classifier", "cut-classifier.pt",
                  lambda d, m: (d / "classifier.pt").read_bytes()[:100_000],
                  r"not a readable PyTorch checkpoint \(truncated"),
    "a tensor cut short": ("judge", "cut-judge.pt", _a_tensor_cut_short,
                           r"not a readable PyTorch checkpoint \(truncated"),
    "malicious": ("generator", "evil.pt", _malicious_generator,
                  r"refused to load: the file contains \S*system, which is outside"),
    "malicious options": ("e4e", "evil-e4e.pt", _malicious_e4e_options,
                          r"refused to load: the file contains \S*eval, which is outside"),
    "an NVIDIA pickle": ("generator", "stylegan2-ffhq-config-f.pkl", _nvidia_pickle,
                         r"refused to load: the file contains dnnlib\.tflib\.network\.Network.*"
                         r"convert it with `maskface weights convert`"),
}


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_preflight_refuses_a_bad_checkpoint_in_one_line_naming_it(kind, where, tmp_path,
                                                                  tiny_dir, s3_server):
    network, file, make, reason = BAD_FILES[kind]
    marker = tmp_path / "marker"
    data = make(tiny_dir, marker) if make else None
    if where == "local":
        uri, options = str(tmp_path / file), None
        if data is not None:
            (tmp_path / file).write_bytes(data)
    else:
        key = f"weights/preflight/{uuid.uuid4().hex}/{file}"
        uri, options = f"s3://{key}", s3_server["options"]
        if data is not None:
            s3_server["fs"].pipe(key, data)
    message = refused(tiny_spec(tiny_dir, **{network: uri}), NETWORKS, options)
    assert re.match(re.escape(uri) + ": " + reason, message), message
    loader = {"generator": load_generator, "classifier": load_classifier,
              "judge": load_judge, "e4e": load_e4e}[network]
    with pytest.raises(CheckpointError) as err:         # what an actor would have said
        loader(WeightRef(uri), storage_options=options)
    assert str(err.value) == message
    assert not marker.exists()              # nothing in the file ran


def _break(sd, how: str) -> str:
    """Break the state dict `sd` in place; return the key the refusal must name."""
    if how == "missing":
        key = last_key(sd)
        del sd[key]
        return f"1 missing keys: {key}"
    if how == "extra":
        prefix = "features." if "features.0.weight" in sd else ""
        sd[prefix + "99.extra.weight"] = torch.zeros(1)
        return "1 unexpected keys: 99.extra.weight"
    key = [k for k, v in sd.items() if v.ndim >= 4 and k.endswith("weight")][-1]
    sd[key] = torch.zeros(*sd[key].shape[:-1], sd[key].shape[-1] + 1)
    return f"1 wrong shapes: {key}: file "


BROKEN = {"generator": "shape", "face_parser": "missing", "classifier": "extra",
          "e4e": "shape", "lpips_trunk": "extra", "judge": "missing"}


@pytest.mark.parametrize("name", list(BROKEN))
def test_preflight_refuses_a_wrong_key_or_shape_naming_it_as_the_loader_does(tmp_path,
                                                                              tiny_dir, name):
    loader, file, state_of = {**LOADERS, "judge": (load_judge, "judge.pt", lambda c: c)}[name]
    ckpt = raw(tiny_dir / file)
    named = _break(state_of(ckpt), BROKEN[name])
    torch.save(ckpt, tmp_path / file)
    message = refused(tiny_spec(tiny_dir, **{name: tmp_path / file}))
    assert message.startswith(f"{tmp_path / file}: does not fit ") and named in message, message
    with pytest.raises(CheckpointError) as err:         # the loader's own line, word for word
        loader(WeightRef(str(tmp_path / file)))
    assert str(err.value) == message


def test_a_refusal_stays_one_short_line_whatever_the_file_holds(tmp_path, tiny_dir):
    sd = raw(tiny_dir / "classifier.pt")
    sd["line one\nline two " + "x" * 1_000_000] = torch.zeros(1)
    torch.save(sd, tmp_path / "classifier.pt")
    message = refused(tiny_spec(tiny_dir, classifier=tmp_path / "classifier.pt"))
    assert message.startswith(f"{tmp_path / 'classifier.pt'}: does not fit BranchedTiny: "
                              "1 unexpected keys: line one line two xxx")
    assert message.endswith("characters)")          # cut, and its length said


def test_a_file_the_loaders_own_checks_do_not_foresee_is_one_line_too(tmp_path, tiny_dir):
    torch.save({"g_ema": {"style.1.weight": 3}}, tmp_path / "g.pt")     # a number, no tensor
    message = refused(tiny_spec(tiny_dir, generator=tmp_path / "g.pt"))
    assert message.startswith(f"{tmp_path / 'g.pt'}: cannot be loaded as the generator: "
                              "AttributeError"), message


def test_preflight_checks_a_pinned_sha256(tiny_dir):
    path = tiny_dir / "classifier.pt"
    message = refused(tiny_spec(tiny_dir, classifier=WeightRef(str(path), "0" * 64)))
    assert message == f"{path}: sha256 mismatch: expected {'0' * 64}, got {sha256_file(path)}"


def test_preflight_checks_what_only_files_together_show_as_load_models_does(tmp_path, tiny_dir,
                                                                           tiny32):
    ckpt = raw(tiny_dir / "stylegan2.pt")
    del ckpt["latent_avg"]
    torch.save(ckpt, tmp_path / "g.pt")
    spec = dataclasses.replace(tiny_spec(tiny_dir, generator=tmp_path / "g.pt"),
                               mean_latent=MeanLatent(source="checkpoint"))
    message = refused(spec, REQUIRED)
    assert message == (f"{tmp_path / 'g.pt'}: no 'latent_avg', which mean_latent.source: "
                       "checkpoint reads; use source: computed")
    with pytest.raises(CheckpointError) as err:
        load_models(spec, parser_size=64, networks=REQUIRED)
    assert str(err.value) == message
    assert preflight(dataclasses.replace(spec, mean_latent=MeanLatent()), REQUIRED)

    spec = tiny_spec(tiny_dir, e4e=tiny32 / "e4e.pt")
    message = refused(spec, NETWORKS)
    assert message == f"{tiny32 / 'e4e.pt'}: made for a 32 px generator, but the generator is 64 px"
    assert preflight(spec, REQUIRED)        # a local-mode job never loads that e4e


def test_preflight_accepts_what_the_loaders_accept_in_every_format(tmp_path, tiny_dir):
    # PyTorch's legacy (pre-zip) format, as torchvision's VGG16 of 2017 is: read, not mapped
    torch.save(raw(tiny_dir / "classifier.pt"), tmp_path / "classifier.pt",
               _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(tmp_path / "classifier.pt")
    # the judge's other format, saved from nn.DataParallel (`module.` on every key)
    torch.save({f"module.{k}": v for k, v in resnet50_judge_state().items()},
               tmp_path / "judge.pt")
    spec = tiny_spec(tiny_dir, classifier=tmp_path / "classifier.pt", judge=tmp_path / "judge.pt")
    hashes = preflight(spec, [*REQUIRED, "judge"])
    assert hashes["classifier"] == sha256_file(tmp_path / "classifier.pt")
    assert hashes["judge"] == sha256_file(tmp_path / "judge.pt")
    assert load_models(spec, parser_size=64, networks=[*REQUIRED, "judge"]).hashes == hashes


def _rezipped(src, dest, change):
    """`src`'s zip rewritten record by record, `change(name, data)` giving each one's bytes."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as new:
        for item in old.infolist():
            new.writestr(item.filename, change(item.filename, old.read(item)))
    return dest


def test_a_shapes_only_load_reads_no_tensor_yet_checks_each_ones_bytes(tmp_path, tiny_dir):
    def tensors(obj):
        return [v for v in obj["g_ema"].values()] + [obj["latent_avg"]]

    path = tiny_dir / "stylegan2.pt"
    assert {t.device.type for t in tensors(safe_load(path, shapes_only=True))} == {"meta"}
    full = safe_load(path)
    assert [t.shape for t in tensors(safe_load(path, shapes_only=True))] == \
        [t.shape for t in tensors(full)]
    # another byte order: torch must swap bytes, so the file is read whole (as the loaders
    # read it), never loaded as shapes (torch 2.14 crashes byteswapping meta storages)
    other = "big" if sys.byteorder == "little" else "little"
    swapped = _rezipped(path, tmp_path / "swapped.pt", lambda name, data: other.encode()
                        if name.endswith("/byteorder") else data)
    assert {t.device.type for t in tensors(safe_load(swapped, shapes_only=True))} == {"cpu"}
    # rewritten by another zip tool, intact: torch's own layout gone, still accepted
    moved = _rezipped(path, tmp_path / "moved.pt", lambda name, data: data)
    assert all(torch.equal(a, b) for a, b in
               zip(tensors(safe_load(moved, shapes_only=True)), tensors(full)))
    # a record padded, or cut short, inside a whole zip: a meta load alone would take it;
    # refused, with the very line reading the file gives
    largest = max(zipfile.ZipFile(path).infolist(), key=lambda i: i.file_size).filename
    for label, edit in (("padded", lambda d: d + b"\0" * 64), ("cut", lambda d: d[:-64])):
        bad = _rezipped(path, tmp_path / f"{label}.pt",
                        lambda name, data: edit(data) if name == largest else data)
        lines = []
        for shapes_only in (False, True):
            with pytest.raises(CheckpointError, match=r"not a readable PyTorch checkpoint") as err:
                safe_load(bad, shapes_only=shapes_only)
            lines.append(str(err.value))
        assert lines[0] == lines[1] and "record size" in lines[0], lines


def test_preflight_on_s3_fills_the_node_cache_the_actors_load_from(s3_server, tiny_dir):
    fs, options = s3_server["fs"], s3_server["options"]
    prefix = f"weights/preflight-ok/{uuid.uuid4().hex}"
    remote = ("generator", "classifier", "judge")    # the 160 MB parser stays local: time
    refs = {}
    for name in remote:
        fs.put_file(str(tiny_dir / FILES[name]), f"{prefix}/{FILES[name]}")
        refs[name] = WeightRef(f"s3://{prefix}/{FILES[name]}",
                               None if name == "judge" else sha256_file(tiny_dir / FILES[name]))
    spec = tiny_spec(tiny_dir, **refs)
    hashes = preflight(spec, remote, options)
    assert hashes == {n: sha256_file(tiny_dir / FILES[n]) for n in REQUIRED + ("judge",)}
    fs.rm(prefix, recursive=True)           # from here on only the node cache holds them
    assert load_models(spec, parser_size=64, networks=remote,
                       storage_options=options).hashes == hashes
