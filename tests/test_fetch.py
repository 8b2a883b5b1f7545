import hashlib
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import yaml

from jobs.cli import main
from models.checkpoints import sha256_file
from models.fetch import SOURCES, DownloadError, download, fetch_weights
from models.tiny import FILES
from nvidia_pickles import official_networks, pickle_bytes


class Files(BaseHTTPRequestHandler):
    """Serves `files` at /ok/NAME (with Range support), /cut/NAME (dies half-way), else 404."""
    files: dict = {}
    requests: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        kind, _, name = self.path.lstrip("/").partition("/")
        self.requests.append((self.path, self.headers.get("Range")))
        body = self.files.get(name)
        if body is None or kind not in ("ok", "cut"):
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and kind == "ok":
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if kind == "cut":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.close()
            return
        self.wfile.write(body[start:])


def generator_pickle(tiny_dir) -> bytes:
    """The tiny generator written as NVIDIA's pickle would hold it."""
    ckpt = torch.load(tiny_dir / FILES["generator"], map_location="cpu", weights_only=True)
    return pickle_bytes(official_networks(ckpt["g_ema"], ckpt["latent_avg"]))


@pytest.fixture
def server(tiny_dir):
    """Opaque bytes for the checkpoints the fetch only hashes; a real pickle to convert."""
    Files.files = {name: hashlib.sha256(name.encode()).digest() * 5000 for name in SOURCES}
    Files.files["generator"] = generator_pickle(tiny_dir)
    Files.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_fetch_downloads_hashes_and_writes_a_spec(tmp_path, server, capsys):
    urls = [f"--url={name}={server}/ok/{name}" for name in SOURCES]
    assert main(["weights", "fetch", "--dest", str(tmp_path), *urls]) == 0
    out = capsys.readouterr().out
    assert "non-commercial" in out and "CelebA" in out and "NVIDIA" in out
    spec = yaml.safe_load((tmp_path / "models.yaml").read_text())
    for name, src in SOURCES.items():
        body = Files.files[name]
        assert (tmp_path / src.filename).read_bytes() == body
        assert "first download" in spec[name]["note"]
        if name != "generator":
            assert spec[name]["sha256"] == hashlib.sha256(body).hexdigest()
    # the generator pickle is converted: the spec names the .pt, the note the .pkl's hash
    assert spec["generator"]["uri"] == "stylegan2-ffhq-config-f.pt"
    assert spec["generator"]["sha256"] == sha256_file(tmp_path / "stylegan2-ffhq-config-f.pt")
    assert hashlib.sha256(Files.files["generator"]).hexdigest() in spec["generator"]["note"]
    assert "converted by maskface" in spec["generator"]["note"]
    assert spec["mean_latent"]["source"] == "checkpoint"

    # a second run verifies by hash and downloads nothing
    before = len(Files.requests)
    assert main(["weights", "fetch", "--dest", str(tmp_path), *urls]) == 0
    assert len(Files.requests) == before
    assert yaml.safe_load((tmp_path / "models.yaml").read_text()) == spec


def test_an_interrupted_download_never_looks_complete_and_resumes(tmp_path, server):
    dest = tmp_path / "classifier.pt"
    with pytest.raises(DownloadError, match="interrupted|got .* of"):
        download(f"{server}/cut/classifier", dest)
    assert not dest.exists()
    part = tmp_path / "classifier.pt.part"
    assert 0 < part.stat().st_size < len(Files.files["classifier"])
    sha = download(f"{server}/ok/classifier", dest)
    assert Files.requests[-1][1] == f"bytes={len(Files.files['classifier']) // 2}-"
    assert dest.read_bytes() == Files.files["classifier"]
    assert sha == hashlib.sha256(Files.files["classifier"]).hexdigest()
    assert not part.exists()


def test_only_one_network_and_a_missing_url(tmp_path, server, capsys):
    spec, _ = fetch_weights(tmp_path, only=["e4e"], urls={"e4e": f"{server}/ok/e4e"})
    data = yaml.safe_load(spec.read_text())
    assert data["e4e"]["sha256"] and "sha256" not in data["classifier"]
    code = main(["weights", "fetch", "--dest", str(tmp_path / "x"), "--only", "classifier",
                 f"--url=classifier={server}/ok/nothing-here"])
    assert code == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert not (tmp_path / "x" / "classifier.pt").exists()


def test_fetch_converts_and_the_spec_passes_weights_check(tmp_path, tiny_dir, capsys):
    """Real tiny checkpoints served over HTTP; NVIDIA's generator as a pickle."""
    Files.files = {name: (tiny_dir / FILES[name]).read_bytes() for name in SOURCES
                   if name != "generator"}
    Files.files["generator"] = generator_pickle(tiny_dir)
    Files.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        urls = [f"--url={name}={base}/ok/{name}" for name in SOURCES]
        assert main(["weights", "fetch", "--dest", str(tmp_path), *urls]) == 0
    finally:
        httpd.shutdown()
    capsys.readouterr()
    assert main(["weights", "check", str(tmp_path / "models.yaml"), "--parser-size", "32"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "ok", out
    line = next(l for l in out.splitlines() if l.startswith("generator"))
    assert "[1, 3, 64, 64]" in line and "mean latent (checkpoint)" in line
    assert "converted from stylegan2-ffhq-config-f.pkl" in line
    # the mean latent is the pickle's dlatent_avg, which was the tiny file's latent_avg
    converted = torch.load(tmp_path / "stylegan2-ffhq-config-f.pt", weights_only=True)
    tiny = torch.load(tiny_dir / FILES["generator"], weights_only=True)
    assert torch.equal(converted["latent_avg"], tiny["latent_avg"])


def test_an_already_downloaded_pickle_is_converted_without_a_download(tmp_path, server):
    (tmp_path / "stylegan2-ffhq-config-f.pkl").write_bytes(Files.files["generator"])
    spec, licences = fetch_weights(tmp_path, only=["generator"],
                                   urls={"generator": f"{server}/ok/nothing"})
    assert Files.requests == []
    assert (tmp_path / "stylegan2-ffhq-config-f.pt").is_file()
    assert any("NVIDIA Source Code License-NC" in line for line in licences)
    data = yaml.safe_load(spec.read_text())
    assert data["generator"]["sha256"] == sha256_file(tmp_path / "stylegan2-ffhq-config-f.pt")
    assert data["mean_latent"]["source"] == "checkpoint"
    # naming some other generator instead goes back to the computed mean latent
    spec, _ = fetch_weights(tmp_path, only=["e4e"], urls={"e4e": f"{server}/ok/e4e"},
                            generator_uri=str(tmp_path / "stylegan2-ffhq-config-f.pt"))
    assert yaml.safe_load(spec.read_text())["mean_latent"]["source"] == "computed"


def test_a_download_that_does_not_convert_says_what_to_do(tmp_path, server, capsys):
    Files.files["generator"] = pickle.dumps({"not": "a network"})
    code = main(["weights", "fetch", "--dest", str(tmp_path), "--only", "generator",
                 f"--url=generator={server}/ok/generator"])
    assert code == 1
    err = capsys.readouterr().err
    assert "not an NVIDIA StyleGAN2 network pickle" in err and "delete it to download again" in err
    assert not (tmp_path / "stylegan2-ffhq-config-f.pt").exists()


def test_convert_command(tmp_path, server, capsys):
    (tmp_path / "net.pkl").write_bytes(Files.files["generator"])
    assert main(["weights", "convert", str(tmp_path / "net.pkl"),
                 "--dest", str(tmp_path / "out" / "g.pt")]) == 0
    out = capsys.readouterr().out
    assert f"sha256 {sha256_file(tmp_path / 'out' / 'g.pt')}" in out
    assert "64 px, style 64, 8 mapping layers" in out and "Licence" in out
    (tmp_path / "bad.pkl").write_bytes(Files.files["generator"][:1000])
    assert main(["weights", "convert", str(tmp_path / "bad.pkl"),
                 "--dest", str(tmp_path / "bad.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a readable pickle" in err
    assert not (tmp_path / "bad.pt").exists()
