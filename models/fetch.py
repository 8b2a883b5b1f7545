"""Download the public checkpoints the original MaskFaceGAN uses, and write a models spec.

Sources are those of the original's download.sh (its Dropbox links), torchvision's
VGG16 for the LPIPS trunk, and NVIDIA's official StyleGAN2 FFHQ pickle, which is
converted on arrival to our generator checkpoint (`models/nvidia_pickle.py`; no
TensorFlow, nothing in the file is run).

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

from pipeline.store.documents import DocumentError, read_yaml
from pipeline.store.uris import redact

from .checkpoints import sha256_file
from .nvidia_pickle import CONVERTER_VERSION, PickleError, convert_pickle
from .spec import NETWORKS, MeanLatent, ModelsSpec, SpecError, WeightRef, write_spec

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
    convert_to: str | None = None   # the pickle is converted; the spec names this file


GENERATOR_FILE = "stylegan2-ffhq-config-f.pt"
GENERATOR_LICENCE = ("StyleGAN2 FFHQ config-f generator: " + NON_COMMERCIAL_NVIDIA +
                     " FFHQ images: CC BY-NC-SA 4.0.")
# NVIDIA moved its StyleGAN2 networks to NGC; nvlabs-fi-cdn.nvidia.com/stylegan2/networks/
# serves the same file (pass it with --url generator=... if NGC is unreachable).
GENERATOR_URL = ("https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan2/versions/1/"
                 "files/stylegan2-ffhq-config-f.pkl")

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
    "generator": Source(GENERATOR_URL, "stylegan2-ffhq-config-f.pkl", GENERATOR_LICENCE,
                        convert_to=GENERATOR_FILE),
}
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
    """Download (and for the generator, convert) the checkpoints into `dest`, and write
    `dest/models.yaml`.

    A file the spec already records is kept when its sha256 still matches. Upstream
    publishes no hashes, so each is recorded at first download and marked as such.
    `generator_uri` names an already converted generator instead of fetching NVIDIA's.
    Returns the spec path and the licence lines to show the user.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    names = list(only) if only else [n for n in SOURCES if not (generator_uri and n == "generator")]
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ValueError(f"cannot fetch {unknown}; choose from {sorted(SOURCES)}")
    if generator_uri and "generator" in names:
        raise ValueError("--generator names a converted generator; do not also fetch one")
    spec_path = dest / "models.yaml"
    previous, mean = _previous_spec(spec_path)
    refs: dict[str, WeightRef] = {}
    licences = []
    for name in names:
        licences.append(f"{name}: {SOURCES[name].licence}")
        progress = progress_factory(name) if progress_factory else None
        refs[name], from_file = _fetch_one(name, dest, (urls or {}).get(name), previous.get(name),
                                           progress)
        if from_file:                               # the mean latent comes from the file
            mean = MeanLatent(source="checkpoint", samples=mean.samples, seed=mean.seed)
    for name, ref in previous.items():      # keep what an earlier fetch recorded
        refs.setdefault(name, ref)
    if generator_uri:
        local = Path(generator_uri)
        refs["generator"] = WeightRef(generator_uri,
                                      sha256_file(local) if local.is_file() else None)
        licences.append(f"generator: {GENERATOR_LICENCE}")
        # a file of unknown make may hold no latent_avg: average the mapping network instead
        mean = MeanLatent(source="computed", samples=mean.samples, seed=mean.seed)
    refs.setdefault("generator", WeightRef(GENERATOR_FILE))
    for name in ("face_parser", "classifier"):
        refs.setdefault(name, WeightRef(SOURCES[name].filename))
    write_spec(ModelsSpec(**refs, mean_latent=mean), str(spec_path),
               header="models spec written by `maskface weights fetch`")
    return spec_path, licences


def _previous_spec(spec_path: Path) -> tuple[dict[str, WeightRef], MeanLatent]:
    """What an earlier fetch into the same folder recorded (URIs kept relative)."""
    if not spec_path.exists():
        return {}, MeanLatent()
    try:      # bounded like every YAML read (pipeline/store/documents.py)
        old = ModelsSpec.from_dict(read_yaml(str(spec_path), what="models spec"))
    except DocumentError as e:
        raise SpecError(str(e)) from None
    return ({n: getattr(old, n) for n in NETWORKS if getattr(old, n) is not None},
            old.mean_latent)


def _fetch_one(name: str, dest: Path, url: str | None, known: WeightRef | None,
               progress: Callable[[int, int | None], None] | None) -> tuple[WeightRef, bool]:
    """One network's file in `dest` (kept when its recorded hash matches, else downloaded
    and, for the generator's pickle, converted): its spec entry, and whether the mean
    latent should come from the file (a converted pickle with a dlatent_avg)."""
    src = SOURCES[name]
    target = src.convert_to or src.filename          # the file the spec names
    if ((dest / target).exists() and known and known.sha256 and known.uri == target
            and sha256_file(dest / target) == known.sha256):
        log.info("%s: %s already complete (sha256 verified)", name, dest / target)
        return known, False
    path = dest / src.filename
    if src.convert_to and path.exists():     # downloads land only when complete
        log.info("%s: converting the pickle already downloaded to %s", name, path)
        sha = sha256_file(path)
    else:
        log.info("%s: downloading %s", name, redact(url or src.url))
        sha = download(url or src.url, path, progress)
    if not src.convert_to:
        return WeightRef(src.filename, sha, RECORDED_NOTE), False
    try:
        done = convert_pickle(str(path), dest / target, source_sha256=sha)
    except PickleError as e:
        raise PickleError(f"{e}. The file stays at {path}; delete it to download again, or "
                          "fetch from another --url") from None
    return (WeightRef(target, done.sha256, f"converted by {CONVERTER_VERSION} from "
                                           f"{src.filename} (sha256 {sha}; {RECORDED_NOTE})"),
            done.latent_avg_norm is not None)
