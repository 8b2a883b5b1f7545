"""Download the public checkpoints the original MaskFaceGAN uses, and write a models spec.

Sources are those of the original's download.sh (its Dropbox links) plus torchvision's
VGG16 for the LPIPS trunk. The StyleGAN2 FFHQ generator is published by NVIDIA only
as a TensorFlow pickle; it must be converted to rosinality's layout first, so it is
named in the spec (by `generator_uri`) rather than downloaded here.

A download is streamed to `<file>.part`, hashed on the way, and renamed into place
only when the byte count matches what the server announced: an interrupted download
never looks complete, and the next run resumes it where the server allows.
"""
from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import yaml

from .checkpoints import redact, sha256_file
from .spec import NETWORKS, ModelsSpec, WeightRef, write_spec

log = logging.getLogger(__name__)

NON_COMMERCIAL_NVIDIA = ("NVIDIA Source Code License-NC: non-commercial research and "
                         "evaluation use only.")
CELEBA_TERMS = ("trained on CelebA / CelebAMask-HQ, whose terms allow non-commercial research "
                "and educational use only.")


@dataclass(frozen=True)
class Source:
    url: str
    filename: str
    licence: str


SOURCES: dict[str, Source] = {
    "classifier": Source("https://www.dropbox.com/s/4j1x9zhri8cndny/state.pt?dl=1",
                         "classifier.pt", "BranchedTiny attribute classifier: " + CELEBA_TERMS),
    "face_parser": Source("https://www.dropbox.com/s/2mwswfq42xvhied/state.pt?dl=1",
                          "face_parser.pt", "DeepLabV3 face parser: " + CELEBA_TERMS),
    "e4e": Source("https://www.dropbox.com/s/t8tm5tbk27wa7er/state.pt?dl=1", "e4e.pt",
                  "e4e encoder: trained on FFHQ (CC BY-NC-SA 4.0) against NVIDIA's StyleGAN2 "
                  "generator; " + NON_COMMERCIAL_NVIDIA),
    "lpips_trunk": Source("https://download.pytorch.org/models/vgg16-397923af.pth",
                          "vgg16-397923af.pth",
                          "torchvision VGG16 (BSD-3-Clause code); trained on ImageNet, whose "
                          "terms allow non-commercial research use only."),
}
GENERATOR_FILE = "stylegan2-ffhq-config-f.pt"
GENERATOR_LICENCE = ("StyleGAN2 FFHQ config-f generator: " + NON_COMMERCIAL_NVIDIA +
                     " FFHQ images: CC BY-NC-SA 4.0.")
RECORDED_NOTE = "sha256 recorded at first download; upstream publishes none"


class DownloadError(RuntimeError):
    pass


def download(url: str, dest: Path, progress: Callable[[int, int | None], None] | None = None,
             chunk: int = 1 << 20, timeout: float = 60) -> str:
    """Fetch `url` into `dest` via `dest.part`; return the sha256 of the complete file."""
    name = redact(url)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "maskface"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:          # the partial file is stale or already complete
            part.unlink()
            return download(url, dest, progress, chunk, timeout)
        raise DownloadError(f"{name}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"{name}: {getattr(e, 'reason', e)}") from None
    with response:
        resumed = have and response.status == 206
        if have and not resumed:
            log.info("%s: server does not resume; starting over", name)
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        h = hashlib.sha256()
        if resumed:
            with open(part, "rb") as f:
                while block := f.read(chunk):
                    h.update(block)
        got = have
        try:
            with open(part, "ab" if resumed else "wb") as f:
                while block := response.read(chunk):
                    f.write(block)
                    h.update(block)
                    got += len(block)
                    if progress:
                        progress(got, total)
        except (OSError, urllib.error.URLError) as e:
            raise DownloadError(f"{name}: interrupted after {got} bytes ({e}); "
                                f"run again to resume") from None
    if total is not None and got != total:
        raise DownloadError(f"{name}: got {got} of {total} bytes; the partial file "
                            f"{part} is kept to resume")
    if got == 0:
        raise DownloadError(f"{name}: empty response")
    os.replace(part, dest)
    return h.hexdigest()


def fetch_weights(dest: str | Path, only: list[str] | None = None,
                  urls: Mapping[str, str] | None = None, generator_uri: str | None = None,
                  progress_factory: Callable[[str], Callable[[int, int | None], None]] | None = None
                  ) -> tuple[Path, list[str]]:
    """Download the checkpoints into `dest` and write `dest/models.yaml`.

    Files already present are checked against the hash in an existing spec and kept
    when they match. Returns the spec path and the licence lines to show the user.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    names = list(only) if only else list(SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ValueError(f"cannot fetch {unknown}; choose from {sorted(SOURCES)}")
    spec_path = dest / "models.yaml"
    previous: dict[str, WeightRef] = {}
    if spec_path.exists():
        old = ModelsSpec.from_dict(yaml.safe_load(spec_path.read_text()))  # URIs kept relative
        previous = {n: getattr(old, n) for n in NETWORKS if getattr(old, n) is not None}

    refs: dict[str, WeightRef] = {}
    licences = []
    for name in names:
        src = SOURCES[name]
        url = (urls or {}).get(name, src.url)
        path = dest / src.filename
        known = previous.get(name)
        if path.exists() and known and known.sha256 and sha256_file(path) == known.sha256:
            log.info("%s: %s already complete (sha256 verified)", name, path)
            refs[name] = WeightRef(src.filename, known.sha256, known.note)
        else:
            log.info("%s: downloading %s", name, redact(url))
            sha = download(url, path, progress_factory(name) if progress_factory else None)
            refs[name] = WeightRef(src.filename, sha, RECORDED_NOTE)
        licences.append(f"{name}: {src.licence}")

    for name, ref in previous.items():      # keep what an earlier fetch recorded
        refs.setdefault(name, ref)
    if generator_uri:
        local = Path(generator_uri)
        refs["generator"] = WeightRef(generator_uri, sha256_file(local) if local.is_file() else None)
    refs.setdefault("generator", WeightRef(GENERATOR_FILE))
    licences.append(f"generator: {GENERATOR_LICENCE}")
    for name in ("face_parser", "classifier"):
        refs.setdefault(name, WeightRef(SOURCES[name].filename))
    write_spec(ModelsSpec(**refs), str(spec_path),
               header="models spec written by `maskface weights fetch`")
    return spec_path, licences
