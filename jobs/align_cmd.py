"""`maskface align` and `maskface paste`: FFHQ alignment of photos, and the way back."""
from __future__ import annotations

import json
import posixpath
import sys

import numpy as np

from manifests.align import LANDMARK_LICENCE, Aligner, align_photos
from manifests.builders import list_images
from pipeline.output.images import paste, png_bytes, read_pil
from pipeline.store.storage import filesystem, write_bytes


def run_align(args) -> int:
    aligner = Aligner(size=args.size, on_multiple=args.multiple)
    fs, path = filesystem(args.input)
    sources = list(list_images(args.input).values()) if fs.isdir(path) else [args.input]
    out = args.output.rstrip("/")
    aligned, failed = align_photos(sources, out, aligner)
    for uri, reason in failed:
        print(f"skipped {uri}: {reason}", file=sys.stderr)
    quads = {posixpath.basename(a.crop_uri): {"source_uri": a.source_uri, "align_quad": a.quad}
             for a in aligned}
    write_bytes(f"{out}/quads.json", json.dumps(quads, indent=2).encode())
    print(f"aligned {len(quads)} of {len(sources)} photo(s) into {out} (quads in quads.json)")
    print(f"note: {LANDMARK_LICENCE}")
    return 1 if failed else 0


def run_paste(args) -> int:
    quad = np.array([float(v) for v in args.quad.split(",")], dtype=np.float64)
    if quad.size != 8:
        print("error: --quad wants 8 numbers x0,y0,...,x3,y3", file=sys.stderr)
        return 2
    result = paste(read_pil(args.source), read_pil(args.edited), quad.reshape(4, 2),
                   feather=args.feather)
    write_bytes(args.out, png_bytes(result))
    print(f"wrote {args.out}")
    return 0


def add_parser(commands) -> None:
    a = commands.add_parser("align", help="FFHQ-align the faces of photos (needs .[align])")
    a.add_argument("input", metavar="IN_URI", help="a photo or a folder of photos")
    a.add_argument("output", metavar="OUT_URI", help="folder for the aligned crops")
    a.add_argument("--size", type=int, default=1024)
    a.add_argument("--multiple", choices=("largest", "skip"), default="largest",
                   help="photos with several faces: take the largest, or skip them")
    a.set_defaults(func=run_align)
    p = commands.add_parser("paste", help="blend an edited crop back into its source photo")
    p.add_argument("--edited", required=True, help="the edited aligned crop")
    p.add_argument("--source", required=True, help="the full original photo")
    p.add_argument("--quad", required=True, help="x0,y0,x1,y1,x2,y2,x3,y3 from alignment")
    p.add_argument("--feather", type=float, default=0.1, help="border ramp, share of the crop")
    p.add_argument("--out", required=True)
    p.set_defaults(func=run_paste)
