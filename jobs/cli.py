"""`maskface`: the command line. Thin wrappers; the work happens in the library.

    maskface weights make-tiny --dest DIR [--resolution 64]
    maskface weights fetch --dest DIR [--only NAME ...] [--generator URI]
    maskface weights convert stylegan2-ffhq-config-f.pkl --dest stylegan2-ffhq-config-f.pt
    maskface weights check SPEC
    maskface run JOB.yaml [--set key=value] [--retry-errors]
    maskface status OUTPUT_URI [--manifest URI] [--watch SECONDS] [--json]
    maskface report OUTPUT_URI [--dest URI]
    maskface export OUTPUT_URI --format hf-parquet|imagefolder --dest URI [--only-successful]
    maskface manifest celebahq --images DIR --attr-file FILE --edit smiling=flip --out URI
    maskface align IN_URI OUT_URI [--size 1024]; maskface paste --edited --source --quad --out
    maskface edit IMAGE... --attribute smiling=1 --models SPEC --out DIR
    maskface bench [--resolution 64 256] [--batch 1 4]
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time

from models.checkpoints import CheckpointError
from models.spec import SpecError


def _weights_make_tiny(args) -> int:
    from models.tiny import TINY_NOTE, make_tiny
    spec = make_tiny(args.dest, resolution=args.resolution, seed=args.seed)
    print(f"wrote {spec}")
    print(f"note: {TINY_NOTE}")
    return 0


def _progress_bar(name):
    from tqdm import tqdm
    bar = None

    def update(done, total):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, initial=0, unit="B", unit_scale=True, desc=name,
                       file=sys.stderr)
        bar.update(done - bar.n)
        if total is not None and done >= total:
            bar.close()
    return update


def _weights_fetch(args) -> int:
    from models.fetch import fetch_weights
    urls = {}
    for item in args.url or []:
        name, sep, url = item.partition("=")
        if not sep:
            print(f"error: --url wants NAME=URL, got {item!r}", file=sys.stderr)
            return 2
        urls[name] = url
    spec, licences = fetch_weights(args.dest, only=args.only, urls=urls,
                                   generator_uri=args.generator, progress_factory=_progress_bar)
    print(f"wrote {spec}")
    print("Licence terms of these weights (read before use):")
    for line in licences:
        print(f"  - {line}")
    print(f"next: maskface weights check {spec}")
    return 0


def _weights_convert(args) -> int:
    from pathlib import Path

    from models.fetch import GENERATOR_LICENCE
    from models.nvidia_pickle import convert_pickle
    dest = args.dest or Path(args.src.split("?")[0]).with_suffix(".pt").name
    done = convert_pickle(args.src, dest)
    c = done.config
    print(f"wrote {done.dest}  (sha256 {done.sha256})")
    print(f"  from      {args.src}  (sha256 {done.source_sha256})")
    print(f"  generator {c['size']} px, style {c['style_dim']}, {c['n_mlp']} mapping layers, "
          f"{done.parameters:,} parameters")
    if done.latent_avg_norm is None:
        print("  the file has no dlatent_avg: use mean_latent: {source: computed} in the spec")
    else:
        print(f"  latent_avg (the file's dlatent_avg) norm {done.latent_avg_norm:.3f}; use it "
              "with mean_latent: {source: checkpoint} in the spec")
    print(f"Licence: {GENERATOR_LICENCE} (for NVIDIA's FFHQ networks)")
    return 0


def _weights_check(args) -> int:
    import torch
    from models.loaders import (load_classifier, load_e4e, load_face_parser, load_generator,
                                load_lpips, mean_latent)
    from models.spec import read_spec

    spec = read_spec(args.spec)
    if spec.tiny:
        print("note: this spec names tiny random-weight checkpoints")
    failures = 0

    def report(name, fn):
        nonlocal failures
        start = time.perf_counter()
        try:
            loaded, shape, extra = fn()
        except (CheckpointError, SpecError, ValueError, RuntimeError) as e:
            failures += 1
            print(f"{name:12s} FAILED  {e}")
            return None
        params = sum(p.numel() for p in loaded.module.parameters())
        print(f"{name:12s} ok  sha256 {loaded.sha256[:16]}  params {params:,}  "
              f"out {list(shape)}{extra}  ({time.perf_counter() - start:.1f} s)")
        return loaded

    state = {}

    def generator():
        g = load_generator(spec.generator)
        w = mean_latent(g, spec.mean_latent)
        gm = g.module
        with torch.no_grad():
            img = gm(w.view(1, 1, -1).repeat(1, gm.n_latent, 1), gm.make_noise(1))
        state["image"] = img
        made = g.extra.get("converted_from")
        origin = (f"  converted from {made.get('file')} (sha256 {str(made.get('sha256'))[:16]}) "
                  f"by {made.get('converter')}" if isinstance(made, dict) else "")
        return g, img.shape, f"  mean latent ({spec.mean_latent.source}) norm {w.norm():.3f}{origin}"

    def needs_image():
        if "image" not in state:
            raise RuntimeError("needs the generator's image, which failed")
        return state["image"]

    def parser():
        p = load_face_parser(spec.face_parser, working_size=args.parser_size)
        with torch.no_grad():
            return p, p.module(needs_image()).shape, ""

    def classifier():
        c = load_classifier(spec.classifier)
        with torch.no_grad():
            return c, c.module(needs_image()).shape, ""

    def e4e():
        e = load_e4e(spec.e4e)
        with torch.no_grad():
            return e, e.module(needs_image()).shape, ""

    def lpips():
        m = load_lpips(spec.lpips_trunk)
        img = needs_image()
        with torch.no_grad():
            d = m.module(img, img.flip(-1), torch.ones_like(img[:, :1]))
        return m, d.shape, f"  lpips(image, mirrored) {d.item():.4f}"

    report("generator", generator)
    report("face_parser", parser)
    report("classifier", classifier)
    if spec.e4e is not None:
        report("e4e", e4e)
    report("lpips", lpips)
    print("ok" if failures == 0 else f"{failures} network(s) failed")
    return 0 if failures == 0 else 1


# Each command's module (weights: this one). A command line that names one imports only
# that module, so `maskface status` starts without torch; --help lists every command.
COMMAND_MODULES = {"run": "run", "status": "status", "report": "report", "export": "export",
                   "manifest": "manifest_cmd", "align": "align_cmd", "paste": "align_cmd",
                   "edit": "edit", "bench": "bench"}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskface", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    weights = commands.add_parser("weights", help="fetch, make or check model checkpoints")
    wsub = weights.add_subparsers(dest="weights_command", required=True)

    tiny = wsub.add_parser("make-tiny", help="write small random-weight checkpoints + spec")
    tiny.add_argument("--dest", required=True, help="output folder")
    tiny.add_argument("--resolution", type=int, default=64, help="generator size (default 64)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_weights_make_tiny)

    fetch = wsub.add_parser("fetch", help="download the public checkpoints (converting NVIDIA's "
                                          "generator pickle) + write a hashed spec")
    fetch.add_argument("--dest", required=True, help="output folder")
    fetch.add_argument("--only", action="append", metavar="NAME",
                       help="fetch only this network (repeatable): generator, classifier, "
                            "face_parser, e4e, lpips_trunk")
    fetch.add_argument("--url", action="append", metavar="NAME=URL",
                       help="download NAME from URL instead (a mirror)")
    fetch.add_argument("--generator", metavar="URI",
                       help="an already converted rosinality-layout generator to name in the "
                            "spec instead of fetching NVIDIA's")
    fetch.set_defaults(func=_weights_fetch)

    convert = wsub.add_parser("convert", help="convert NVIDIA's StyleGAN2 TensorFlow .pkl to our "
                                              "generator checkpoint (no TensorFlow; runs nothing "
                                              "from the file)")
    convert.add_argument("src", help="the .pkl (path or fsspec URI), e.g. stylegan2-ffhq-config-f.pkl")
    convert.add_argument("--dest", help="output .pt (default: the source name with .pt, here)")
    convert.set_defaults(func=_weights_convert)

    check = wsub.add_parser("check", help="load every network of a spec and run one forward")
    check.add_argument("spec", help="models spec URI")
    check.add_argument("--parser-size", type=int, default=512,
                       help="face parser working size (512 for the real weights)")
    check.set_defaults(func=_weights_check)

    named = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")),
                 None)
    wanted = [COMMAND_MODULES[named]] if named in COMMAND_MODULES else COMMAND_MODULES.values()
    for name in dict.fromkeys(wanted):
        importlib.import_module(f"jobs.{name}").add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (CheckpointError, SpecError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # download errors and the like: one line, not a traceback
        if args.verbose:
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
