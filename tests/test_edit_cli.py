import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from jobs.edit import parse_attribute
from pipeline.engine.rows import unique_stems

MASKFACE = str(Path(sys.executable).parent / "maskface")
FAST = ["--set", "steps.latent=6", "--set", "steps.noise=1", "--set", "loss.start_steps.classf=2",
        "--set", "loss.start_steps.seg=2", "--set", "dynamic_masking_iters=2",
        "--set", "parser_size=64"]


def test_edit_writes_image_latent_metrics_and_mask_and_survives_a_bad_file(tmp_path, tiny_dir):
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((90, 120, 3)) * 255).astype("uint8")).save(tmp_path / "wide.jpg")
    Image.fromarray((rng.random((40, 40)) * 255).astype("uint8"), "L").save(tmp_path / "grey.png")
    (tmp_path / "broken.png").write_text("not an image")
    out = tmp_path / "out"
    result = subprocess.run(
        [MASKFACE, "edit", str(tmp_path / "wide.jpg"), str(tmp_path / "broken.png"),
         str(tmp_path / "grey.png"), "--attribute", "smiling", "--attribute", "black_hair=0",
         "--models", str(tiny_dir / "models.yaml"), "--out", str(out), "--batch-size", "2",
         *FAST], capture_output=True, text=True, timeout=600)
    assert result.returncode == 1                      # one input failed
    assert "broken.png: not a readable image" in result.stderr
    assert "tiny random-weight" in result.stderr
    for name in ("wide", "grey"):
        edited = np.asarray(Image.open(out / f"{name}.png"))
        assert edited.shape == (64, 64, 3) and edited.dtype == np.uint8
        mask = np.asarray(Image.open(out / f"{name}.mask.png"))
        assert mask.shape == (64, 64)
        latent = np.load(out / f"{name}.npy")
        assert latent.shape == (10, 64) and latent.dtype == np.float32
        record = json.loads((out / f"{name}.json").read_text())
        assert record["status"] == "ok" and record["tiny_models"] is True
        assert record["attributes"] == ["smiling", "black_hair"] and record["targets"] == [1.0, 0.0]
        assert set(record["metrics"]["prob_result"]) == {"smiling", "black_hair"}
        assert record["metrics"]["steps"] == 6 + 2
    assert not (out / "broken.png").exists()


def test_edit_rejects_bad_values_before_any_work(tmp_path, tiny_dir):
    for args, message in [(["--attribute", "smilling"], "unknown attribute(s) ['smilling']"),
                          (["--attribute", "smiling=2"], "targets must be numbers in [0, 1]"),
                          (["--attribute", "smiling", "--size", "-1"], "size must be"),
                          (["--attribute", "smiling", "--set", "steps.latnt=3"], "steps.latnt")]:
        result = subprocess.run([MASKFACE, "edit", "x.png", "--models", str(tiny_dir / "models.yaml"),
                                 "--out", str(tmp_path), *args], capture_output=True, text=True)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_attribute_and_name_parsing():
    assert parse_attribute("smiling") == ("smiling", 1.0)
    assert parse_attribute("male=0") == ("male", 0.0)
    assert unique_stems(["a/x.png", "b/x.jpg", "s3://b/y z.png"]) == ["x", "x-1", "y_z"]


def run_in_a_terminal(argv: list[str], timeout: float = 600) -> str:
    """What a terminal would show: the command's stdout and stderr on one pseudo-terminal
    of 120 columns (with no size set, tqdm draws nothing)."""
    import fcntl
    import os
    import pty
    import struct
    import termios
    import time
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(argv, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    chunks, deadline = [], time.time() + timeout
    while time.time() < deadline:
        try:
            data = os.read(leader, 65536)
        except OSError:                      # the command closed the terminal: it is done
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=max(deadline - time.time(), 1))
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def test_log_lines_in_a_terminal_never_break_the_progress_bar(tmp_path, tiny_dir):
    """In a terminal each log line stands on its own line above the bar: where a record
    printed into the bar, the line would start with the bar's text, not the record's."""
    photo = Path(__file__).parents[1] / "jobs" / "demo" / "astronaut-64.png"
    screen = run_in_a_terminal(
        [MASKFACE, "edit", str(photo), "--attribute", "smiling", "--models",
         str(tiny_dir / "models.yaml"), "--out", str(tmp_path / "out"), *FAST,
         "--set", "steps.latent=12", "--set", "steps.log=2"])
    assert "ok ->" in screen, screen[-2000:]
    records = [line.rstrip("\r").split("\r")[-1] for line in screen.split("\n")
               if " INFO " in line]
    assert len(records) >= 5, screen[-2000:]             # the steps' log lines, and others
    assert "%|" in screen                                 # the bar was drawn
    glued = [r for r in records if not re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", r)]
    assert glued == [], glued
