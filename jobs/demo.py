"""Write the demo manifest: a few edits of the face photo the repo ships.

    python -m jobs.demo demo-out/manifest.parquet

The manifest lies in demo-out/, the photo in jobs/demo/: the manifest records that folder
as the root of its inputs, as the builders do, so the job reads the photo without
`inputs.allow` and without a warning.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from manifests.schema import write_manifest

PHOTO = Path(__file__).parent / "demo" / "astronaut-64.png"
EDITS = [("smiling", 1.0), ("wearing_lipstick", 0.0), ("black_hair", 1.0), ("male", 1.0)]


def demo_manifest(photo: Path = PHOTO) -> pd.DataFrame:
    return pd.DataFrame({
        "id": [f"astronaut.{name}-{int(t)}" for name, t in EDITS],
        "image_uri": [str(photo.resolve())] * len(EDITS),
        "attributes": [[name] for name, _ in EDITS],
        "targets": [[t] for _, t in EDITS],
        "source": ["skimage astronaut (NASA, public domain)"] * len(EDITS),
    })


def write_demo_manifest(out: str, photo: Path = PHOTO) -> None:
    """The demo manifest at `out`, recording the photo's folder as its inputs' root."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_manifest(demo_manifest(photo), out, input_roots=[str(photo.resolve().parent)])


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "demo-out/manifest.parquet"
    write_demo_manifest(out)
    print(f"wrote {out}: {len(EDITS)} edits of {PHOTO.name}")
