import multiprocessing as mp

import pytest
import torch

from models.checkpoints import CheckpointError, cache_dir, local_file, sha256_file
from pipeline.store.uris import redact
from models.loaders import load_models
from models.spec import REQUIRED, read_spec
from models.tiny import make_tiny


def test_load_models_holds_every_network_and_its_hash(tiny_dir):
    spec = read_spec(str(tiny_dir / "models.yaml"))
    models = load_models(spec, parser_size=64)
    assert models.tiny
    assert set(models.hashes) == {"generator", "face_parser", "classifier", "e4e", "lpips_trunk",
                                  "judge"}
    assert models.hashes["generator"] == sha256_file(tiny_dir / "stylegan2.pt")
    assert models.mean_latent.shape == (models.generator.style_dim,)
    assert models.face_parser.working_size == 64
    local_only = load_models(spec, parser_size=64, networks=REQUIRED)
    assert local_only.e4e is None and local_only.lpips is None and local_only.judge is None
    torch.testing.assert_close(local_only.mean_latent, models.mean_latent)


def test_an_e4e_for_another_generator_size_is_refused(tiny_dir, tmp_path):
    make_tiny(tmp_path, resolution=32)
    (tmp_path / "models.yaml").write_text(
        (tmp_path / "models.yaml").read_text().replace(
            "uri: stylegan2.pt", f"uri: {tiny_dir / 'stylegan2.pt'}").replace(
            "sha256: " + sha256_file(tmp_path / "stylegan2.pt"),
            "sha256: " + sha256_file(tiny_dir / "stylegan2.pt")))
    with pytest.raises(CheckpointError, match="made for a 32 px generator, but the generator is 64 px"):
        load_models(read_spec(str(tmp_path / "models.yaml")), parser_size=32)


def test_credentials_never_reach_messages():
    assert redact("https://user:secret@host/x.pt?X-Amz-Signature=abc") == "https://***@host/x.pt?***"
    assert redact("s3://bucket/key.pt") == "s3://bucket/key.pt"
    # a library quoting a URI's parts without its scheme (botocore's bucket check)
    assert redact('Invalid bucket name "user:secret@bucket": ...') == \
        'Invalid bucket name "***@bucket": ...'
    assert redact("mail a@b.org at 10:30") == "mail a@b.org at 10:30"
    with pytest.raises(CheckpointError) as err:
        local_file("https://user:secret@127.0.0.1:9/none.pt?token=abc", None)
    assert "secret" not in str(err.value) and "abc" not in str(err.value)


def _copy(uri, sha, options, cache, queue):
    import os
    os.environ["MASKFACE_CACHE"] = cache
    queue.put(str(local_file(uri, sha, options)))


def test_processes_on_one_node_share_one_cached_copy(s3_server, tiny_dir):
    s3_server["fs"].put_file(str(tiny_dir / "e4e.pt"), "weights/shared/e4e.pt")
    uri, sha = "s3://weights/shared/e4e.pt", sha256_file(tiny_dir / "e4e.pt")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_copy, args=(uri, sha, s3_server["options"], str(cache_dir()), queue))
             for _ in range(3)]
    for p in procs:
        p.start()
    paths = {queue.get(timeout=120) for _ in procs}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(paths) == 1
    folder = cache_dir() / "files"
    copies = [p for p in folder.rglob("e4e.pt*") if not p.name.endswith(".lock")]
    assert [str(p) for p in copies] == list(paths)
    assert sha256_file(copies[0]) == sha
