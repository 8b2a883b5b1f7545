import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from manifests.builders import (Report, Subset, apply_subset, build_rows, celeba_partition,
                                list_images, parse_attribute_file, parse_edits, parse_shard)
from jobs.demo import PHOTO, write_demo_manifest
from jobs.manifest_cmd import input_roots
from manifests.builders import images_root
from manifests.schema import ManifestError, read_manifest
from pipeline.runner.access import InputPolicy, recorded_roots

CELEBA_HEADER = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs "
                 "Big_Lips Big_Nose Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows "
                 "Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones "
                 "Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin "
                 "Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
                 "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace "
                 "Wearing_Necktie Young").split()
SMILING = CELEBA_HEADER.index("Smiling")


@pytest.fixture
def celebahq(tmp_path):
    """Ten images 0.jpg..9.jpg; the label file lists 0..8 plus a missing 99.jpg and one
    malformed line; 9.jpg is unlisted."""
    images = tmp_path / "images"
    images.mkdir()
    for k in range(10):
        Image.fromarray(np.full((8, 8, 3), k * 20, np.uint8)).save(images / f"{k}.jpg")
    rng = np.random.default_rng(0)
    lines = ["11", " ".join(CELEBA_HEADER)]
    labels = {}
    for k in list(range(9)) + [99]:
        v = rng.choice([-1, 1], size=40)
        labels[f"{k}.jpg"] = v
        lines.append(f"{k}.jpg  " + " ".join(str(x) for x in v))
    lines.append("bad.jpg 1 -1 2")                       # malformed
    (tmp_path / "anno.txt").write_text("\n".join(lines) + "\n")
    return tmp_path, labels


def test_attribute_file_parsing_and_the_report(celebahq):
    root, labels = celebahq
    report = Report()
    header, parsed = parse_attribute_file((root / "anno.txt").read_text(), report)
    assert header[SMILING] == "smiling" and header[0] == "5_o_clock_shadow"
    assert set(parsed) == {f"{k}.jpg" for k in list(range(9)) + [99]}
    assert parsed["3.jpg"] == [1 if v == 1 else 0 for v in labels["3.jpg"]]
    assert any("line 13: malformed" in p for p in report.problems)
    report = Report()
    parse_attribute_file("3\nSmiling Unicorn\nx.jpg 1 -1\n", report)
    assert any("unknown attribute name 'unicorn'" in p for p in report.problems)
    assert any("count line says 3" in p for p in report.problems)


def test_flip_targets_the_opposite_of_each_label(celebahq):
    root, labels = celebahq
    report = Report()
    header, parsed = parse_attribute_file((root / "anno.txt").read_text(), report)
    rows = build_rows(list_images(str(root / "images")), parse_edits(["smiling=flip", "male=1"], True),
                      parsed, header, report)
    flips = rows[rows["attributes"].map(lambda a: a[0] == "smiling")]
    assert len(flips) == 9                                # 0..8; 9 unlisted, 99 missing
    for row in flips.to_dict("records"):
        assert row["targets"][0] == 1 - row["attr_smiling"]
        assert row["id"] == f"{Path(row['image_uri']).stem}.smiling-{int(row['targets'][0])}"
    assert rows["attr_smiling"].dtype == np.int8
    assert (rows[rows["id"].str.contains("male-1")]["targets"].map(lambda t: t[0]) == 1.0).all()
    assert any("99.jpg: listed in the attribute file, but no such image" in p
               for p in report.problems)
    assert any("9.jpg: image not listed" in p for p in report.problems)


def test_strict_fails_on_any_problem(celebahq):
    root, _ = celebahq
    report = Report()
    header, parsed = parse_attribute_file((root / "anno.txt").read_text(), report)
    with pytest.raises(ManifestError, match="problem.*strict"):
        build_rows(list_images(str(root / "images")), [("smiling", "flip")], parsed, header,
                   report, strict=True)


def test_sampling_is_reproducible_and_shards_are_disjoint_and_complete():
    files = [f"{k:05d}.jpg" for k in range(103)]
    a = apply_subset(files, Subset(sample=40, seed=3))
    assert a == apply_subset(files, Subset(sample=40, seed=3)) and len(a) == 40
    assert a != apply_subset(files, Subset(sample=40, seed=4))
    shards = [apply_subset(files, Subset(shard=(i, 4))) for i in range(4)]
    assert sorted(sum(shards, [])) == files                # cover the whole
    assert sum(len(s) for s in shards) == len(files)       # disjoint
    sampled_shards = [apply_subset(files, Subset(sample=40, seed=3, shard=(i, 3)))
                      for i in range(3)]
    assert sorted(sum(sampled_shards, [])) == a
    assert apply_subset(files, Subset(sample=40, seed=3, shard=(1, 3), limit=5)) == \
        sampled_shards[1][:5]
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_celeba_partition_and_folder_builder(tmp_path, celebahq):
    report = Report()
    keep = celeba_partition("0.jpg 0\n1.jpg 2\n2.jpg 2\noops\n", "test", report)
    assert keep == {"1.jpg", "2.jpg"} and "malformed" in report.problems[0]
    root, _ = celebahq
    with pytest.raises(ValueError, match="flip needs"):
        parse_edits(["smiling=flip"], with_labels=False)
    with pytest.raises(ValueError, match="unknown attribute"):
        parse_edits(["smilling=1"], with_labels=False)
    rows = build_rows(list_images(str(root / "images" / "*.jpg")),
                      parse_edits(["black_hair=1"], False), None, None, Report())
    assert len(rows) == 10 and rows["id"].iloc[0] == "0.black_hair-1"


def test_manifest_command_writes_a_valid_manifest(celebahq):
    root, _ = celebahq
    maskface = str(Path(sys.executable).parent / "maskface")
    out = root / "m.parquet"
    result = subprocess.run([maskface, "manifest", "celebahq", "--images", str(root / "images"),
                             "--attr-file", str(root / "anno.txt"), "--edit", "smiling=flip",
                             "--edit", "young=0", "--sample", "6", "--seed", "1",
                             "--shard", "0/2", "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "input problem(s) skipped" in result.stderr
    manifest = read_manifest(str(out))
    rows = manifest.rows
    assert len(rows) == 3 * 2 and rows["id"].is_unique
    # the folder the images came from, recorded: a job reads them without inputs.allow
    assert recorded_roots(manifest.schema) == (str((root / "images").resolve()),)
    strict = subprocess.run([maskface, "manifest", "celebahq", "--images", str(root / "images"),
                             "--attr-file", str(root / "anno.txt"), "--edit", "smiling=flip",
                             "--strict", "--out", str(root / "s.parquet")],
                            capture_output=True, text=True, timeout=120)
    assert strict.returncode == 1 and "strict" in strict.stderr
    assert not (root / "s.parquet").exists()


@pytest.mark.parametrize("images,root", [
    ("/data/CelebA-HQ-img", "/data/CelebA-HQ-img"), ("photos/*.png", "photos"),
    ("/data/a/img_*.jpg", "/data/a"), ("/data/a/*/x?.jpg", "/data/a"), ("*.png", "."),
    ("s3://bucket/faces/[0-9]*.jpg", "s3://bucket/faces"), ("s3://bucket/*.jpg", "s3://bucket"),
])
def test_images_root_is_the_folder_the_images_option_names(images, root):
    assert images_root(images) == root


def test_every_builder_records_the_folders_its_rows_read(tmp_path, celebahq):
    """The folder builder over a glob, and --align's crops and photos: each manifest
    records where its rows' inputs lie, and its rows lie there."""
    root, _ = celebahq
    maskface = str(Path(sys.executable).parent / "maskface")
    out = tmp_path / "manifests" / "folder.parquet"
    result = subprocess.run([maskface, "manifest", "folder", "--images",
                             f"{root}/images/[0-4].jpg", "--edit", "black_hair=1",
                             "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(str(out))
    policy = InputPolicy().for_manifest(str(out), manifest.schema)
    assert recorded_roots(manifest.schema) == (str((root / "images").resolve()),)
    assert len(manifest.rows) == 5
    for uri in manifest.rows["image_uri"]:
        policy.check(uri)                                   # each row is read as it is
    aligned = Namespace(images=f"{root}/photos/*.png", align=True, aligned_out="s3://b/crops/")
    assert input_roots(aligned) == [f"{root}/photos", "s3://b/crops/"]
    assert input_roots(Namespace(images="s3://b/photos", align=False)) == ["s3://b/photos"]
    with pytest.raises(ValueError, match="a glob must lie below a bucket"):
        images_root("s3://bucket*/x.png")


def test_the_demo_manifest_records_the_folder_of_its_photo(tmp_path):
    out = tmp_path / "demo-out" / "manifest.parquet"
    write_demo_manifest(str(out))
    manifest = read_manifest(str(out))
    assert recorded_roots(manifest.schema) == (str(PHOTO.resolve().parent),)
    policy = InputPolicy().for_manifest(str(out), manifest.schema)
    for uri in manifest.rows["image_uri"]:
        policy.check(uri)
