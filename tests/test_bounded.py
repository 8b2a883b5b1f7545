"""Bounded input to every parser and message (issue 30).

A YAML alias bomb ("billion laughs": nine anchors, each nine aliases of the one before)
in a job spec, a models spec, an edit settings file or a `--set` value is refused at its
first anchor, in milliseconds and without growing: measured in a subprocess (peak RSS,
its high-water mark reset before each case, the address space capped so a bomb that did
expand fails that process instead of the machine). A spec over the size cap is refused
naming its size. And a catalogue of hostile values, each 5 MB, run through the real
entry points: no message is over MAX_MESSAGE bytes, and each says the value's length.
A new parser joins the catalogue with one line; without clipping it fails here.
"""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import MAX_MESSAGE

ROOT = Path(__file__).parents[1]
HUGE = 5_000_000                  # characters of each hostile value
MEMORY_BOUND_MB = 100
TIME_BOUND_S = 5.0                # generous: the refusal takes milliseconds
REFUSED = "YAML anchors and aliases are not accepted"


def list_bomb() -> str:
    """A flow list of nine anchored lists, each nine aliases of the one before: 9**9
    leaves once expanded, a few hundred bytes as written."""
    levels = ["&a0 [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "[" + ", ".join(levels) + "]"


def mapping_bomb() -> str:
    """The same as nested mappings: flattened into dotted keys, 9**9 of them."""
    levels = ["l0: &m0 {" + ", ".join(f"k{j}: lol" for j in range(9)) + "}"]
    levels += [f"l{i}: &m{i} {{" + ", ".join(f"k{j}: *m{i - 1}" for j in range(9)) + "}"
               for i in range(1, 9)]
    return "{" + ", ".join(levels) + "}"


GOOD_SPEC = "manifest: m.parquet\noutput: out\nmodels: m.yaml\n"

# Each case: (the files to write in its folder, the call to make there). Every case runs
# in one subprocess (the imports once), each measured around its call alone.
BOMBS = {
    "job spec, under batch_size": ({"job.yaml": GOOD_SPEC + f"batch_size: {list_bomb()}\n"},
                                   "load_job_spec('job.yaml')"),
    "job spec, under edit": ({"job.yaml": GOOD_SPEC + f"edit: {mapping_bomb()}\n"},
                             "load_job_spec('job.yaml')"),
    "job spec, under storage_options": (
        {"job.yaml": GOOD_SPEC + f"storage_options: {mapping_bomb()}\n"},
        "load_job_spec('job.yaml')"),
    "models spec": ({"models.yaml": f"generator: {list_bomb()}\nface_parser: f.pt\n"
                                    "classifier: c.pt\n"}, "read_spec('models.yaml')"),
    "--config file": ({"config.yaml": mapping_bomb()},
                      "read_config_file('config.yaml')"),
    "--config text": ({"config.yaml": mapping_bomb()},
                      "read_overrides(open('config.yaml').read())"),
    "--set value": ({"job.yaml": GOOD_SPEC},
                    f"load_job_spec('job.yaml', ['batch_size={list_bomb()}'])"),
    "maskface run": ({"job.yaml": GOOD_SPEC + f"batch_size: {list_bomb()}\n"},
                     "cli(['run', 'job.yaml'])"),
}

# Run in the subprocess: the imports first (they are not a case's memory); then per case,
# in its folder, the RSS high-water mark reset (/proc/self/clear_refs), the call, and its
# time, peak RSS growth and message. The address space is capped at its size after the
# imports plus 512 MiB: a bomb that did expand fails with MemoryError, not the machine.
MEASURE = r"""
import contextlib, io, json, os, re, resource, sys, time
from jobs.cli import main
from jobs.options import read_config_file, read_overrides
from jobs.run import load_job_spec
from models.spec import read_spec

def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))

def cli(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    raise SystemExit(f"exit {code}: {err.getvalue()}")

size = status("VmSize") * 1024 + (1 << 29)
resource.setrlimit(resource.RLIMIT_AS, (size, resource.getrlimit(resource.RLIMIT_AS)[1]))
results = {}
for name, (folder, call) in json.loads(sys.argv[1]).items():
    os.chdir(folder)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    started = time.perf_counter()
    try:
        eval(call)
        message = "not refused"
    except BaseException as e:
        message = f"{type(e).__name__}: {e}"
    results[name] = {"seconds": time.perf_counter() - started,
                     "growth_mb": (status("VmHWM") - before) / 1024,
                     "message": message[:4000], "length": len(message)}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    """Each bomb case's figures, measured in one subprocess."""
    cases = {}
    for k, (name, (files, call)) in enumerate(BOMBS.items()):
        folder = tmp_path_factory.mktemp(f"bomb{k}")
        for file, text in files.items():
            (folder / file).write_text(text)
        cases[name] = (str(folder), call)
    done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(cases)],
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(BOMBS))
def test_an_alias_bomb_is_refused_fast_and_small(case, bombs):
    got = bombs[case]
    print(f"{case}: refused in {got['seconds'] * 1000:.1f} ms, peak RSS growth "
          f"{got['growth_mb']:.1f} MB")
    assert REFUSED in got["message"], got["message"][:500]
    assert got["length"] <= MAX_MESSAGE + 200          # the exception's type name and all
    assert got["seconds"] < TIME_BOUND_S
    assert got["growth_mb"] < MEMORY_BOUND_MB


# ---- the size cap ----------------------------------------------------------------------
def oversize_cases(tmp_path: Path):
    from jobs.options import parse_set, read_config_file
    from jobs.run import load_job_spec
    from models.spec import read_spec
    big = "# " + "x" * (2 << 20) + "\n"
    (tmp_path / "job.yaml").write_text(GOOD_SPEC + big)
    (tmp_path / "models.yaml").write_text(big)
    (tmp_path / "config.yaml").write_text(big)
    return {"job spec": lambda: load_job_spec(str(tmp_path / "job.yaml")),
            "models spec": lambda: read_spec(str(tmp_path / "models.yaml")),
            "--config file": lambda: read_config_file(str(tmp_path / "config.yaml")),
            "--set value": lambda: parse_set([f"batch_size={big}"])}


@pytest.mark.parametrize("case", ["job spec", "models spec", "--config file", "--set value"])
def test_an_oversize_document_is_refused_naming_its_size(case, tmp_path):
    call = oversize_cases(tmp_path)[case]
    with pytest.raises(ValueError) as refused:
        call()
    message = str(refused.value)
    assert re.search(r"2,097,\d{3} (bytes|characters), over the limit of 1,048,576", message), \
        message
    assert len(message.encode()) <= MAX_MESSAGE


def test_the_bounded_loader_reads_what_specs_hold_and_refuses_the_rest():
    from pipeline.store.documents import DocumentError, load_yaml
    assert load_yaml("a: [1, 2.5, true, null, x]\nb: {c: d}\n", "t") == \
        {"a": [1, 2.5, True, None, "x"], "b": {"c": "d"}}
    assert load_yaml("", "t") is None
    for text, why in [("a: &x 1\nb: 2\n", REFUSED), ("a: *x\n", REFUSED),
                      ("a: " + "[" * 40 + "]" * 40, "nested deeper than"),
                      ("a: " + "9" * 5000, "not valid YAML"), ("a: 2024-02-30", "not valid YAML"),
                      ("a: !!python/object/apply:os.system [ls]", "not valid YAML"),
                      ("a: 1\n---\nb: 2\n", "not valid YAML")]:
        with pytest.raises(DocumentError, match=why):
            load_yaml(text, "t")


# ---- hostile values through the real entry points --------------------------------------
X = "x" * HUGE


def write_manifest_file(path: Path, **column) -> str:
    rows = {"id": ["a"], "image_uri": ["a.png"], "attributes": [["smiling"]], "targets": [[1.0]]}
    rows.update(column)
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows)), path)
    return str(path)


def catalogue(tmp: Path) -> dict:
    """Every parser and entry point that quotes what it was given, each handed a 5 MB
    value: name -> a call that returns or raises the message (a CLI call: its stderr)."""
    from jobs.options import parse_set, read_overrides
    from jobs.run import load_job_spec
    from manifests.schema import read_manifest
    from models.spec import ModelsSpec, read_spec
    from pipeline.engine.settings import EditConfig
    from pipeline.runner.spec import JobSpec
    from pipeline.store.storage import read_bytes, refuse_credentials
    from pipeline.store.uris import under
    spec = {"manifest": "m.parquet", "output": "out", "models": "m.yaml"}
    networks = {"face_parser": "f.pt", "classifier": "c.pt"}

    def job() -> str:
        (tmp / "job.yaml").write_text(GOOD_SPEC)
        return str(tmp / "job.yaml")
    return {
        "manifest: id": lambda: read_manifest(write_manifest_file(tmp / "i.parquet", id=[X])),
        "manifest: attribute": lambda: read_manifest(
            write_manifest_file(tmp / "a.parquet", attributes=[[X]])),
        "manifest: targets": lambda: read_manifest(
            write_manifest_file(tmp / "t.parquet", targets=[[X]])),
        "manifest: its URI": lambda: read_manifest(f"{tmp}/{X}"),
        "storage: an object's URI": lambda: read_bytes(f"{tmp}/{X}", 100),
        "storage: a credential key": lambda: refuse_credentials({X + ".key": 1}, "options"),
        "output: a row's path": lambda: under(str(tmp), f"../{X}"),
        "models spec: its path": lambda: read_spec(f"{tmp}/{X}"),
        "models spec: a value": lambda: ModelsSpec.from_dict(
            {"generator": {"uri": "g.pt", "sha256": X}, **networks}),
        "models spec: a key": lambda: ModelsSpec.from_dict({X: 1, "generator": "g", **networks}),
        "job spec: its path": lambda: load_job_spec(f"{tmp}/{X}"),
        "job spec: an unknown key": lambda: JobSpec.from_dict({**spec, X: 1}),
        "job spec: a numeric key": lambda: JobSpec.from_dict({**spec, "batch_size": X}),
        "job spec: a runtime key": lambda: JobSpec.from_dict({**spec, "runtime": {X: 1}}),
        "job spec: where": lambda: JobSpec.from_dict({**spec, "actors": X}, where=X),
        "job spec: storage_options": lambda: JobSpec.from_dict(
            {**spec, "storage_options": {X + ".secret": 1}}),
        "edit settings: a key": lambda: EditConfig.from_overrides({X: 1}),
        "edit settings: a value": lambda: EditConfig.from_overrides({"steps.latent": X}),
        "edit settings: a mode": lambda: EditConfig.from_overrides({"mode": X}),
        "--set: an item": lambda: parse_set([X]),
        "--set: a value": lambda: parse_set([f"batch_size={X}"]),
        "--set: through load_job_spec": lambda: load_job_spec(job(), [f"{X}=1"]),
        "--config text": lambda: read_overrides(f"{X}: 1"),
        "maskface run --set": lambda: ["run", job(), "--set", f"actors={X}"],
        "maskface status": lambda: ["status", f"{tmp}/{X}"],
        "maskface <an unknown command>": lambda: [X],
        "maskface export --format": lambda: ["export", str(tmp), "--format", X,
                                             "--dest", str(tmp / "export")],
        "maskface weights check": lambda: ["weights", "check", f"{tmp}/{X}"],
        "maskface manifest --edit": lambda: ["manifest", "folder", "--images", str(tmp),
                                             "--edit", f"{X}=1", "--out", str(tmp / "m.parquet")],
        "maskface edit --attribute": lambda: ["edit", str(tmp / "a.png"), "--attribute",
                                              f"{X}=1", "--models", str(tmp / "m.yaml"),
                                              "--out", str(tmp / "edits")],
    }


CATALOGUE_NAMES = list(catalogue(Path("/nonexistent")))      # building it writes nothing


def message_of(call, capsys) -> str:
    """What the call says: its exception's message, or a command line's stderr."""
    from jobs.cli import main
    try:
        got = call()
    except Exception as e:       # noqa: BLE001 -- any kind: the message is what is checked
        return str(e)
    if isinstance(got, list):
        capsys.readouterr()
        try:
            assert main(got) != 0
        except SystemExit as usage:           # argparse's own errors
            assert usage.code != 0
        return capsys.readouterr().err
    raise AssertionError(f"not refused: {got!r:.200}")


@pytest.mark.parametrize("case", CATALOGUE_NAMES)
def test_no_message_is_over_2_kb_and_each_says_the_length(case, tmp_path, capsys):
    started = time.perf_counter()
    message = message_of(catalogue(tmp_path)[case], capsys)
    lines = message.splitlines() or [""]
    assert all(len(line.encode()) <= MAX_MESSAGE for line in lines), \
        max(len(line.encode()) for line in lines)
    said = [int(n.replace(",", "")) for n in re.findall(r"(\d[\d,]*) characters", message)]
    assert said and max(said) >= HUGE, message[:600]
    if not case.startswith("maskface "):
        # a library's message: the whole of it bounded, each value quoted clipped; the
        # command line's last defence (jobs/cli.py) bounds each line it prints
        assert len(message.encode()) <= MAX_MESSAGE, len(message.encode())
        assert "x" * 1000 not in message
    assert time.perf_counter() - started < 30


# ---- redaction stays bounded, and never cuts a credential in half ----------------------
def test_redact_is_bounded_in_time_and_never_leaves_half_a_credential():
    from pipeline.errors import MAX_ECHO
    from pipeline.store.uris import redact
    for hostile in ["=a:b" * (HUGE // 4), "(a:" * (HUGE // 3), X]:
        started = time.perf_counter()
        out = redact(hostile)
        assert time.perf_counter() - started < 1.0
        assert len(out) < 5000 and f"({len(hostile):,} characters)" in out
    secret = "p" * 5000
    for text in [f"s3://user:{secret}@bucket/key", f"failed: user:{secret}@host:9000",
                 f"s3://AKIA{secret}@bucket/key"]:
        for limit in (MAX_ECHO, 20, 4096):
            out = redact(text, limit)
            assert "ppp" not in out and "AKIA" not in out, out
            assert out.endswith(f"({len(text):,} characters)")
    assert redact("s3://user:pw@bucket/k?token=1") == "s3://***@bucket/k?***"


# ---- the suite's own check of long log lines (tests/conftest.py) -----------------------
def test_a_long_warning_is_caught_by_the_suite_check():
    from conftest import LONG_RECORDS
    logging.getLogger("maskface.test").warning("%s", "y" * (MAX_MESSAGE + 1))
    found, LONG_RECORDS.found[:] = list(LONG_RECORDS.found), []    # this test's own: cleared
    assert len(found) == 1 and "2,049 bytes" in found[0]
    logging.getLogger("maskface.test").warning("%s", "y" * MAX_MESSAGE)
    assert LONG_RECORDS.found == []


def test_every_yaml_read_goes_through_the_bounded_loader():
    """No product module parses YAML but pipeline/store/documents.py: a `yaml.safe_load`
    added elsewhere would let a bomb back in. (Writing YAML, `safe_dump`, is free.)"""
    readers = re.compile(r"\byaml\.(safe_load|load|full_load|unsafe_load|load_all|"
                         r"safe_load_all|compose|parse)\b|\bCSafeLoader\b|\bSafeLoader\b")
    found = [f"{path.relative_to(ROOT)}:{n}"
             for package in ("jobs", "manifests", "models", "pipeline")
             for path in sorted((ROOT / package).rglob("*.py"))
             if path != ROOT / "pipeline" / "store" / "documents.py"
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if readers.search(line)]
    assert found == []
