"""`maskface weights make-tiny|fetch|convert|check`: the checkpoints a models spec names."""
from __future__ import annotations

import sys


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
    from models.check import check_networks
    from models.spec import read_spec
    spec = read_spec(args.spec)
    if spec.tiny:
        print("note: this spec names tiny random-weight checkpoints")
    failures = 0
    for result in check_networks(spec, parser_size=args.parser_size):
        print(result.line())
        failures += not result.ok
    print("ok" if failures == 0 else f"{failures} network(s) failed")
    return 0 if failures == 0 else 1


def add_parser(commands) -> None:
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
