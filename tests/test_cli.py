import subprocess
import sys
from pathlib import Path

import torch

MASKFACE = str(Path(sys.executable).parent / "maskface")


def run(*args):
    return subprocess.run([MASKFACE, *args], capture_output=True, text=True, timeout=300)


def test_make_tiny_then_check_every_network(tmp_path):
    made = run("weights", "make-tiny", "--dest", str(tmp_path), "--resolution", "32")
    assert made.returncode == 0, made.stderr
    assert "random weights" in made.stdout
    checked = run("weights", "check", str(tmp_path / "models.yaml"), "--parser-size", "32")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    lines = checked.stdout.splitlines()
    assert lines[-1] == "ok"
    assert "tiny random-weight" in lines[0]
    for name, shape in [("generator", "[1, 3, 32, 32]"), ("face_parser", "[1, 9, 32, 32]"),
                        ("classifier", "[1, 40]"), ("e4e", "[1, 8, 64]"), ("lpips", "[1]")]:
        line = next(l for l in lines if l.startswith(name))
        assert " ok " in line and shape in line, line

    # a broken file is reported by name, the others still checked, exit code 1
    sd = torch.load(tmp_path / "classifier.pt", weights_only=True)
    sd.pop("celeba_mean")
    torch.save(sd, tmp_path / "classifier.pt")
    checked = run("weights", "check", str(tmp_path / "models.yaml"), "--parser-size", "32")
    assert checked.returncode == 1
    assert "classifier   FAILED" in checked.stdout and "sha256 mismatch" in checked.stdout
    assert "e4e          ok" in checked.stdout


def test_bad_spec_is_one_clear_line(tmp_path):
    (tmp_path / "m.yaml").write_text("generator: g.pt\nweird: 1\n")
    result = run("weights", "check", str(tmp_path / "m.yaml"))
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error:") and "weird" in result.stderr
    assert "Traceback" not in result.stderr
