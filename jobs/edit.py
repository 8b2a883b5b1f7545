"""`maskface edit`: edit image files on one machine, without Ray.

For each input it writes, under --out: <name>.png (the edited image), <name>.npy (the
W+ latent, float32 [n_latent, style_dim]), <name>.json (metrics) and <name>.mask.png
(the blend mask, 8-bit). A bad image fails alone; the others are still edited.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from models.loaders import load_models
from models.spec import read_spec
from pipeline.engine.editor import Editor
from pipeline.engine.rows import BLENDS, MODES, EditRequest, unique_stems
from pipeline.engine.runtime import Runtime
from pipeline.engine.schedule import Schedule
from pipeline.engine.settings import EditConfig, apply_mean_latent, required_networks
from pipeline.errors import RowError
from pipeline.output.images import encode_png, read_image
from pipeline.output.layout import npy_bytes
from pipeline.store.storage import write_bytes

from .options import parse_set, read_config_file

log = logging.getLogger(__name__)


def parse_attribute(text: str) -> tuple[str, float]:
    """'smiling' -> ('smiling', 1.0); 'smiling=0' -> ('smiling', 0.0); targets in [0, 1]."""
    name, sep, value = text.partition("=")
    if not sep:
        return name.strip(), 1.0
    try:
        target = float(value)
    except ValueError:
        raise ValueError(f"--attribute {text!r}: the target must be a number in [0, 1]") from None
    return name.strip(), target


def build_config(args) -> EditConfig:
    overrides: dict = {}
    if args.config:
        overrides.update(read_config_file(args.config))
    overrides.update(parse_set(args.set or []))
    for key, value in (("mode", args.mode), ("smoothing", args.smoothing), ("blend", args.blend)):
        if value is not None:
            overrides[key] = value
    if args.e4e_init:
        overrides["e4e_init"] = True
    return EditConfig.from_overrides(overrides)


def run_edit(args) -> int:
    attrs = [parse_attribute(a) for a in args.attribute]
    request = EditRequest(tuple(a for a, _ in attrs), tuple(t for _, t in attrs),
                          size=args.size, seed=args.seed)
    config = build_config(args)
    settings = config.resolve(request.attributes)
    spec = apply_mean_latent(read_spec(args.models), settings)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = load_models(spec, device=device, parser_size=settings.parser_size,
                         networks=(*required_networks([settings]), "judge"))  # if named
    if spec.tiny:
        print("note: tiny random-weight models: the outputs are not real edits", file=sys.stderr)
    runtime = Runtime()
    runtime.apply(torch.device(device))
    editor = Editor(models, config, runtime)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = unique_stems(args.images)
    failures = 0
    steps_per_batch = Schedule.for_group(settings).total_iterations

    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start:start + args.batch_size]
        batch_names = names[start:start + args.batch_size]
        images, kept = [], []
        for path, name in zip(paths, batch_names):
            try:
                images.append(read_image(path, editor.resolution))
                kept.append((path, name))
            except RowError as e:            # unreadable, missing, too small, ...
                failures += 1
                print(f"error: {e}", file=sys.stderr)
        if not images:
            continue
        bar = _progress(steps_per_batch, f"images {start + 1}-{start + len(paths)}")
        results = editor.edit(torch.stack(images), [request] * len(images),
                              settings=[settings] * len(images), callback=lambda info: bar.update(1) if info.rows[0] == 0 else None)
        bar.close()
        for (path, name), result in zip(kept, results):
            record = {"source": path, "attributes": list(request.attributes),
                      "targets": list(request.targets), "size": request.size,
                      "seed": request.seed, "tiny_models": spec.tiny,
                      "model_hashes": models.hashes}
            if not result.ok:
                failures += 1
                print(f"error: {path}: {result.error}", file=sys.stderr)
                record.update(status="error", error=result.error)
            else:
                write_bytes(str(out / f"{name}.png"), encode_png(result.edited))
                write_bytes(str(out / f"{name}.mask.png"), encode_png(result.masks["blend"]))
                write_bytes(str(out / f"{name}.npy"), npy_bytes(result.latent.float().numpy()))
                record.update(status="ok", metrics=result.metrics)
            write_bytes(str(out / f"{name}.json"), json.dumps(record, indent=2).encode())
            if result.ok:
                print(f"{path}: ok -> {out / name}.png")
    return 1 if failures else 0


def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False)


def add_parser(commands) -> None:
    p = commands.add_parser("edit", help="edit image files on this machine (no Ray)",
                            description=__doc__.split("\n")[0])
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image paths or fsspec URIs")
    p.add_argument("--attribute", action="append", required=True, metavar="NAME[=T]",
                   help="attribute to edit, target T in [0, 1] (default 1); repeatable")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--models", required=True, metavar="SPEC",
                   help="models spec (maskface weights fetch, or make-tiny for a test set)")
    p.add_argument("--size", type=float, default=0.0, help="edit-region size factor (0: off)")
    p.add_argument("--blend", choices=BLENDS)
    p.add_argument("--mode", choices=MODES)
    p.add_argument("--smoothing", type=float, help="classifier target = |t - smoothing|")
    p.add_argument("--e4e-init", action="store_true", help="start local edits from e4e")
    p.add_argument("--seed", type=int, default=0, help="seed of the redrawn noise maps")
    p.add_argument("--config", help="YAML file of edit settings")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="edit setting override, e.g. steps.latent=200 (repeatable)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=4)
    p.set_defaults(func=run_edit)
