"""The judge (models/judge.py): a held-out attribute classifier, loaded from either of its
two file formats, strictly, and named in the models spec, `make-tiny` and `weights check`."""

import pytest
import torch
import yaml

from helpers import PlantsAMarker
from models.celeba import ATTRIBUTE_INDEX, ATTRIBUTES, CELEBA_FILE_ORDER
from models.check import check_networks
from models.checkpoints import CheckpointError, sha256_file
from models.fetch import fetch_weights
from models.judge import Judge
from models.loaders import load_judge, load_models
from models.spec import ModelsSpec, WeightRef, read_spec
from models.tiny import resnet50_judge_state


@pytest.fixture(scope="module")
def resnet50_judge(tmp_path_factory):
    """A random-weight torchvision ResNet-50 with 40 outputs, saved as its plain state
    dict (~95 MB), once for the module: (path, state dict)."""
    state = resnet50_judge_state(seed=1)
    path = tmp_path_factory.mktemp("resnet50-judge") / "resnet50_judge.pt"
    torch.save(state, path)
    return path, state


def raw(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def images(n=2, size=64):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def judge_file(fmt, tiny32, resnet50_judge):
    return tiny32 / "judge.pt" if fmt == "branched" else resnet50_judge[0]


def judge_state(fmt, tiny32, resnet50_judge):
    return raw(tiny32 / "judge.pt") if fmt == "branched" else dict(resnet50_judge[1])


@pytest.mark.parametrize("fmt,prefixed", [("branched", False), ("resnet50", False),
                                          ("resnet50", True)])
def test_each_format_loads_strictly_and_gives_forty_logits(fmt, prefixed, tiny32, resnet50_judge,
                                                           tmp_path):
    path = judge_file(fmt, tiny32, resnet50_judge)
    state = judge_state(fmt, tiny32, resnet50_judge)
    if prefixed:        # as nn.DataParallel saves it
        path = tmp_path / "data_parallel.pt"
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    loaded = load_judge(WeightRef(str(path)))
    judge = loaded.module
    assert isinstance(judge, Judge) and judge.format == fmt == loaded.extra["format"]
    assert loaded.sha256 == sha256_file(path)
    assert not judge.training and not any(p.requires_grad for p in judge.parameters())
    on_disk = judge.network.state_dict()
    assert on_disk.keys() == state.keys()
    assert all(torch.equal(on_disk[k], v) for k, v in state.items())
    with torch.no_grad():
        logits = judge(images())
    assert logits.shape == (2, 40) and logits.isfinite().all()
    assert not torch.allclose(logits[0], logits[1])     # the image reaches the logits


def test_resnet50_judge_resizes_and_normalises_with_imagenet_statistics(resnet50_judge):
    judge = load_judge(WeightRef(str(resnet50_judge[0]))).module
    x = images(1, 448)
    by_hand = torch.nn.functional.avg_pool2d(x, 2)          # area resize 448 -> 224
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        raw = judge.network((by_hand - mean) / std)       # in list_attr_celeba.txt's order
        got = judge(x)
    torch.testing.assert_close(got[:, ATTRIBUTE_INDEX["smiling"]],
                               raw[:, CELEBA_FILE_ORDER.index("smiling")])
    torch.testing.assert_close(got, raw[:, [CELEBA_FILE_ORDER.index(a) for a in ATTRIBUTES]])


def set_fc_classes(state, classes=1000):
    state["fc.weight"] = torch.zeros(classes, 2048)
    state["fc.bias"] = torch.zeros(classes)


def drop_last(state):
    state.pop(list(state)[-1])


@pytest.mark.parametrize("fmt,edit,problem", [
    ("resnet50", set_fc_classes, r"fc\.weight is \[1000, 2048\], but a ResNet-50 judge has "
                                 r"\[40, 2048\]"),
    ("branched", drop_last, r"does not fit BranchedTiny: 1 missing keys: fc_layers\.15-16\.39"),
    ("resnet50", drop_last, r"does not fit ResNet: 1 missing keys: fc\.bias"),
    # `module.` is dropped only when every key has it
    ("branched", lambda s: s.__setitem__("module.extra.weight", torch.zeros(1)),
     r"does not fit BranchedTiny: 1 unexpected keys: module\.extra\.weight"),
    ("resnet50", lambda s: s.__setitem__("fc2.weight", torch.zeros(1)),
     r"does not fit ResNet: 1 unexpected keys: fc2\.weight"),
    ("branched", lambda s: [s.pop(k) for k in list(s) if k.startswith("conv_layers.01-06")],
     r"not a judge: the keys are neither BranchedTiny's .* nor a torchvision ResNet-50's"),
], ids=["resnet50-1000-classes", "branched-missing-key", "resnet50-missing-key",
        "branched-extra-key", "resnet50-extra-key", "neither-format"])
def test_a_judge_that_does_not_fit_names_the_file_and_the_problem(fmt, edit, problem, tiny32,
                                                                  resnet50_judge, tmp_path):
    state = judge_state(fmt, tiny32, resnet50_judge)
    edit(state)
    path = tmp_path / "bad_judge.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"bad_judge\.pt: " + problem):
        load_judge(WeightRef(str(path)))


def test_a_judge_pickle_carrying_code_is_refused_and_nothing_runs(tiny32, tmp_path):
    state = raw(tiny32 / "judge.pt")
    state["conv_layers.01-06.0.0.weight"] = PlantsAMarker(tmp_path / "marker")
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused to load.*system"):
        load_judge(WeightRef(str(tmp_path / "evil.pt")))
    assert not (tmp_path / "marker").exists()


def test_make_tiny_names_a_judge_that_load_models_loads(tiny32):
    spec = read_spec(str(tiny32 / "models.yaml"))
    assert spec.judge == WeightRef(str(tiny32 / "judge.pt"), sha256_file(tiny32 / "judge.pt"))
    models = load_models(spec, parser_size=32, networks=["judge"])
    assert isinstance(models.judge, Judge) and models.judge.format == "branched"
    assert models.hashes["judge"] == sha256_file(tiny32 / "judge.pt")
    assert models.e4e is None and models.lpips is None       # only what was asked for
    with torch.no_grad():
        judged, classified = models.judge(images()), models.classifier(images())
    assert judged.shape == classified.shape == (2, 40)
    assert (judged - classified).abs().max() > 0.1             # another network's opinion


def test_a_spec_without_a_judge_loads_without_one(tiny32, tmp_path):
    data = yaml.safe_load((tiny32 / "models.yaml").read_text())
    del data["judge"]
    spec = ModelsSpec.from_dict(data, base=str(tiny32 / "models.yaml"))
    assert spec.judge is None and "judge" not in spec.to_dict()
    models = load_models(spec, parser_size=32, networks=["judge"])
    assert models.judge is None and "judge" not in models.hashes


def test_fetch_has_no_judge_to_download(tmp_path):
    with pytest.raises(ValueError, match=r"cannot fetch \['judge'\]"):
        fetch_weights(tmp_path, only=["judge"])
    assert not list(tmp_path.iterdir())


def test_weights_check_runs_the_judge(tiny32):
    data = yaml.safe_load((tiny32 / "models.yaml").read_text())
    del data["e4e"], data["lpips_trunk"]     # the judge needs only the generator's image
    spec = ModelsSpec.from_dict(data, base=str(tiny32 / "models.yaml"))
    lines = {c.name: c for c in check_networks(spec, parser_size=32)}
    assert list(lines) == ["generator", "face_parser", "classifier", "lpips", "judge"]
    judge = lines["judge"]
    assert judge.ok, judge.error            # whatever became of the LPIPS line
    assert judge.out_shape == (1, 40) and judge.sha256 == sha256_file(tiny32 / "judge.pt")
    assert judge.line().startswith("judge        ok") and "format branched" in judge.line()
