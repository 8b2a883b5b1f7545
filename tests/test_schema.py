"""Manifest-level limits, checked before any work: list columns longer than the
attributes that exist, manifests too big for one driver, the empty manifest."""
from argparse import Namespace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.run import run_command
from manifests.schema import MAX_ROWS, ManifestError, read_manifest, validate, write_manifest
from models.classifier import ATTRIBUTES


def one_row(**values):
    row = {"id": "r0", "image_uri": "p.png", "attributes": ["smiling"], "targets": [1.0]}
    row.update(values)
    return pd.DataFrame({k: [v] for k, v in row.items()})


@pytest.mark.parametrize("values,words", [
    ({"attributes": list(ATTRIBUTES) + ["smiling"], "targets": [1.0] * 41},
     "41 attributes listed; there are only 40"),
    ({"targets": [1.0] * 100_000}, "100000 targets listed; there are only 40 attributes"),
    ({"align_quad": [0.0] * 9}, "align_quad must be 8 finite numbers, got 9 values"),
    ({"align_quad": [0.0] * 7 + [float("nan")]}, "align_quad must be 8 finite numbers"),
    ({"targets": [float("nan")] * 40, "attributes": list(ATTRIBUTES)}, "targets must be numbers"),
])
def test_list_columns_longer_than_the_attributes_are_refused(values, words):
    with pytest.raises(ManifestError, match="row 0") as err:
        validate(one_row(**values))
    assert words in str(err.value)
    assert len(str(err.value)) < 600                      # a huge value is not echoed whole


def test_a_manifest_is_written_whole_into_a_folder_made_for_it(tmp_path):
    rows = pd.DataFrame({"id": ["a"], "image_uri": ["a.png"], "attributes": [["smiling"]],
                         "targets": [[1.0]]})
    write_manifest(rows, str(tmp_path / "runs" / "new" / "m.parquet"))
    assert read_manifest(str(tmp_path / "runs" / "new" / "m.parquet")).ids == ["a"]
    assert [p.name for p in (tmp_path / "runs" / "new").iterdir()] == ["m.parquet"]  # no temp


def test_values_read_from_parquet_are_shown_as_written(tmp_path):
    """Parquet hands numpy arrays and scalars; the message shows what the user wrote."""
    rows = pd.DataFrame({"id": ["a", "b", "c"], "image_uri": ["p.png"] * 3,
                         "attributes": [[], ["smiling"], ["smilng", "smilng"]],
                         "targets": [[1.0], [None], [1.0, 1.0]],
                         "size": [0.0, -2.5, 0.0]})
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), tmp_path / "m.parquet")
    with pytest.raises(ManifestError) as err:
        read_manifest(str(tmp_path / "m.parquet"))
    text = str(err.value)
    assert "row 0 (id 'a'): attributes must be a non-empty list of names, got []" in text
    assert "row 1 (id 'b'): targets must be numbers in [0, 1], got [nan]" in text
    assert "row 1 (id 'b'): size must be a number >= 0, got -2.5" in text
    assert "row 2 (id 'c'): unknown attribute(s) ['smilng', 'smilng']" in text
    assert "np." not in text and "array(" not in text and "dtype" not in text


def test_a_manifest_too_big_for_one_driver_is_refused_from_its_footer(tmp_path):
    n = MAX_ROWS + 1
    ids = pa.array([f"r{k}" for k in range(n)])
    table = pa.table({"id": ids, "image_uri": pa.array(["p.png"] * n)})
    pq.write_table(table, tmp_path / "big.parquet")            # no lists: cheap to write
    with pytest.raises(ManifestError) as err:
        read_manifest(str(tmp_path / "big.parquet"))
    text = str(err.value)
    assert f"{n:,} rows, over the limit of {MAX_ROWS:,} for one driver" in text
    assert "maskface manifest ... --shard i/n" in text
    small = one_row()
    pq.write_table(pa.Table.from_pandas(small), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=r"bytes of Parquet, over the limit of 100 "):
        read_manifest(str(tmp_path / "m.parquet"), max_bytes=100)
    (tmp_path / "folder").mkdir()
    for k in range(3):
        pq.write_table(pa.Table.from_pandas(one_row(id=f"r{k}")), tmp_path / "folder" / f"{k}.parquet")
    with pytest.raises(ManifestError, match="3 rows, over the limit of 2"):
        read_manifest(str(tmp_path / "folder"), max_rows=2)
    assert len(read_manifest(str(tmp_path / "folder"), max_rows=3).rows) == 3


def test_an_empty_manifest_is_a_clean_no_op(tmp_path, capsys):
    empty = one_row().iloc[:0]
    pq.write_table(pa.Table.from_pandas(empty, preserve_index=False), tmp_path / "m.parquet")
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"manifest": str(tmp_path / "m.parquet"),
                                    "output": str(tmp_path / "out"),
                                    "models": str(tmp_path / "absent.yaml")}))
    import ray
    was_running = ray.is_initialized()
    assert run_command(Namespace(spec=str(spec), set=[], address=None, retry_errors=False)) == 0
    assert "has no rows: nothing to do" in capsys.readouterr().out
    assert not (tmp_path / "out").exists() and ray.is_initialized() == was_running


def test_a_resume_checks_only_the_ids_of_the_rows_already_complete(tmp_path):
    """A resumed run does not redo complete rows, so their values are not checked (a
    million of them would take a minute); their ids still are, and every other row
    whole."""
    rows = pd.DataFrame({"id": ["a", "b", "c", "d"], "image_uri": ["p.png"] * 4,
                         "attributes": [["smiling"], ["smilng"], ["smiling"], ["male"]],
                         "targets": [[1.0], [1.0], [1.0], [2.0]]})
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), tmp_path / "m.parquet")
    uri = str(tmp_path / "m.parquet")
    with pytest.raises(ManifestError) as err:
        read_manifest(uri, complete={"b"})
    assert "row 3 (id 'd'): targets must be numbers in [0, 1]" in str(err.value)
    assert "id 'b'" not in str(err.value) and "1 manifest row(s)" in str(err.value)

    manifest = read_manifest(uri, complete={"b", "d"})
    assert manifest.rows["id"].tolist() == ["a", "c"] and manifest.ids == ["a", "b", "c", "d"]
    assert manifest.rows["image_uri"].tolist() == [str(tmp_path / "p.png")] * 2

    twice = pd.concat([rows, rows.iloc[[1]]], ignore_index=True)
    with pytest.raises(ManifestError, match=r"row 4 \(id 'b'\): duplicate id \(appears 2 times\)"):
        validate(twice, complete={"b", "d"})
    with pytest.raises(ManifestError, match=r"row 0 \(id '\.\./x'\): unsafe id"):
        validate(rows.assign(id=["../x", "b", "c", "d"]), complete={"../x", "b", "d"})
