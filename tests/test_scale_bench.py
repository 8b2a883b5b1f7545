"""The scale benchmark (tests/scale_bench.py) runs end to end at a small size: every
command it times succeeds on both layouts, so its figures stay figures of working
commands. Its timings are not asserted: they are a benchmark's, not a test's."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_scale_bench_times_every_command_on_both_layouts(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "scale_bench.py"), "--rows", "40",
                          "--layout", "both", "--work", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert [(r["rows"], r["layout"]) for r in lines] == [(40, "compacted"), (40, "small files")]
    for r in lines:
        figures = r["local"]
        assert set(figures) == {"status", "report", "export", "resume", "status after resume"}
        assert all(isinstance(v, float) and v > 0 for v in figures.values()), figures
