"""A refactor's check: one fixed job on tiny weights, run with this checkout's code, and
the digests of what it wrote. Run it before and after a change that should not change
results, with the same WORK folder, and compare the two JSON files:

    python tests/output_digest.py /tmp/digest-work before.json    # on the old commit
    python tests/output_digest.py /tmp/digest-work after.json     # on the new one
    diff before.json after.json

The job: a local edit, a global edit, an error row (a missing image), a paste-back and a
row resumed from a first run; the output given as a relative path. The digests: sha256
of every image, latent, mask, noise and pasted file, and every metrics column but those
that differ from run to run (RUN_VARYING)."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from helpers import SHORT  # noqa: E402

from manifests.schema import write_manifest  # noqa: E402

RUN_VARYING = ["written_at", "seconds", "identity_seconds", "code_version", "node", "actor",
               "gpu_ids", "time_read_s", "time_engine_s", "time_write_s", "time_post_s",
               "time_wait_s"]
QUAD = [20.0, 10.0, 20.0, 60.0, 70.0, 60.0, 70.0, 10.0]


def maskface(*args: str, cwd: Path | None = None) -> int:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=cwd,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}).returncode


def write_inputs(work: Path) -> pd.DataFrame:
    photos = work / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray((rng.random((48, 48, 3)) * 255).astype("uint8")).save(photos / f"p{k}.png")
    Image.fromarray((rng.random((80, 100, 3)) * 255).astype("uint8")).save(photos / "big.png")
    return pd.DataFrame({
        "id": ["loc", "glob", "err", "paste", "res"],
        "image_uri": [str(photos / n) for n in ("p0.png", "p1.png", "missing.png", "p2.png",
                                                 "p1.png")],
        "attributes": [["smiling"], ["male"], ["smiling"], ["black_hair"], ["wearing_lipstick"]],
        "targets": [[1.0], [1.0], [1.0], [1.0], [0.0]],
        "mode": ["local", "global", "auto", "auto", "auto"],
        "source_uri": [None, None, None, str(photos / "big.png"), None],
        "align_quad": [None, None, None, QUAD, None]})


def run_jobs(work: Path, rows: pd.DataFrame) -> None:
    """The last row alone first (so the second run resumes it), then every row."""
    for name, part in (("first", rows.iloc[[4]].reset_index(drop=True)), ("all", rows)):
        write_manifest(part, str(work / f"{name}.parquet"))
        spec = {"manifest": str(work / f"{name}.parquet"), "output": "out",
                "models": str(work / "w" / "models.yaml"), "batch_size": 2, "edit": SHORT,
                "paste_back": True, "cpu_threads": 1}
        (work / f"{name}.yaml").write_text(yaml.safe_dump(spec))
        print(name, "exit", maskface("run", str(work / f"{name}.yaml"), "--no-report", cwd=work))


def digests(out: Path) -> dict:
    files = {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(out.rglob("*")) if p.is_file()
             and p.relative_to(out).parts[0] in ("images", "latents", "masks", "noises", "pasted")}
    metrics = pd.read_parquet(out / "metrics").sort_values("id").reset_index(drop=True)
    metrics = metrics.drop(columns=[c for c in RUN_VARYING if c in metrics])
    columns = {c: [repr(v.tolist() if hasattr(v, "tolist") else v) for v in metrics[c]]
               for c in metrics.columns}
    return {"files": files, "metrics": columns}


def main(work: Path, dest: str) -> None:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    maskface("weights", "make-tiny", "--dest", str(work / "w"), "--resolution", "32",
             "--seed", "0")
    run_jobs(work, write_inputs(work))
    found = digests(work / "out")
    Path(dest).write_text(json.dumps(found, indent=1, sort_keys=True))
    print(f"{len(found['files'])} files, {len(found['metrics']['id'])} metrics rows -> {dest}")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), sys.argv[2])
