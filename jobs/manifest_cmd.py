"""`maskface manifest celebahq|celeba|folder|helen ... --out URI`: build a manifest."""
from __future__ import annotations

import sys

from manifests.builders import (Report, Subset, build_rows, celeba_partition, images_root,
                                list_images, parse_attribute_file, parse_edits, parse_shard,
                                read_text)
from manifests.schema import write_manifest


def align_rows(rows, aligned_out: str, size: int, on_multiple: str, report: Report):
    """Align each row's photo once, point the rows at the crops, keep `source_uri` and
    `align_quad` (8 floats: the crop quad's corners in source pixels)."""
    from manifests.align import Aligner, align_photos
    aligned, failed = align_photos(rows["image_uri"], aligned_out,
                                   Aligner(size=size, on_multiple=on_multiple))
    for uri, reason in failed:
        report.add(f"{uri}: not aligned: {reason}")
    crops = {a.source_uri: a for a in aligned}
    rows = rows[rows["image_uri"].isin(crops)].copy()
    rows["source_uri"] = rows["image_uri"]
    rows["align_quad"] = [crops[u].quad for u in rows["image_uri"]]
    rows["image_uri"] = [crops[u].crop_uri for u in rows["image_uri"]]
    return rows.reset_index(drop=True)


def input_roots(args) -> list[str]:
    """The folders the manifest's rows read from, recorded in it: the images' folder
    (the photos, `source_uri`, with --align) and the aligned crops' (`image_uri`)."""
    roots = [images_root(args.images)]
    if getattr(args, "align", False):
        roots.append(args.aligned_out)
    return roots


def run_manifest(args) -> int:
    if getattr(args, "align", False) and not args.aligned_out:
        print("error: --align needs --aligned-out URI for the aligned crops", file=sys.stderr)
        return 2
    report = Report()
    roots = input_roots(args)             # an --images it cannot record fails first
    labelled = args.dataset in ("celebahq", "celeba")
    edits = parse_edits(args.edit, with_labels=labelled)
    subset = Subset(sample=args.sample, seed=args.seed, shard=parse_shard(args.shard),
                    limit=args.limit)
    images = list_images(args.images)
    header = labels = None
    if labelled:
        header, labels = parse_attribute_file(read_text(args.attr_file), report)
        if args.dataset == "celeba" and args.partition:
            keep = celeba_partition(read_text(args.partition), args.split, report)
            labels = {f: v for f, v in labels.items() if f in keep}
            images = {f: u for f, u in images.items() if f in keep}
    rows = build_rows(images, edits, labels, header, report, subset, strict=args.strict)
    if getattr(args, "align", False):
        rows = align_rows(rows, args.aligned_out, args.size, args.multiple, report)
    write_manifest(rows, args.out, input_roots=roots)
    if report.problems:
        print(f"{len(report.problems)} input problem(s) skipped:\n{report.summary()}",
              file=sys.stderr)
    print(f"wrote {args.out}: {len(rows)} rows ({rows['image_uri'].nunique()} images x "
          f"{len(edits)} edit(s))")
    return 0


def add_parser(commands) -> None:
    p = commands.add_parser("manifest", help="build a manifest from a dataset or a folder")
    sub = p.add_subparsers(dest="dataset", required=True)
    for name, helptext in (("celebahq", "CelebA-HQ images + CelebAMask-HQ-attribute-anno.txt"),
                           ("celeba", "CelebA images + list_attr_celeba.txt"),
                           ("helen", "Helen images (no labels: targets 0 or 1)"),
                           ("folder", "any folder or glob of images (targets 0 or 1)")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("--images", required=True, help="folder URI or glob of the images")
        if name in ("celebahq", "celeba"):
            q.add_argument("--attr-file", required=True, help="the 40-attribute label file")
        if name == "celeba":
            q.add_argument("--partition", help="list_eval_partition.txt")
            q.add_argument("--split", default="test", help="train, val or test (default test)")
        if name != "celebahq":
            q.add_argument("--align", action="store_true",
                           help="FFHQ-align the faces first (needs the align extra)")
            q.add_argument("--aligned-out", help="folder URI for the aligned crops")
            q.add_argument("--size", type=int, default=1024, help="aligned crop size")
            q.add_argument("--multiple", choices=("largest", "skip"), default="largest",
                           help="photos with several faces: the largest, or skip them")
        q.add_argument("--edit", action="append", required=True, metavar="NAME=flip|0|1",
                       help="edit to apply to every image (repeatable)")
        q.add_argument("--out", required=True, help="manifest URI to write (Parquet)")
        q.add_argument("--strict", action="store_true",
                       help="fail on any input problem instead of skipping it")
        q.add_argument("--sample", type=int, help="a random subset of N images")
        q.add_argument("--seed", type=int, default=0, help="seed of --sample")
        q.add_argument("--shard", help="i/n: the i-th of n disjoint shards (0-based)")
        q.add_argument("--limit", type=int, help="at most N images")
        q.set_defaults(func=run_manifest)
