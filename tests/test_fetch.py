import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from jobs.cli import main
from models.fetch import SOURCES, DownloadError, download, fetch_weights


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


@pytest.fixture
def server():
    Files.files = {name: hashlib.sha256(name.encode()).digest() * 5000 for name in SOURCES}
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
        assert spec[name]["sha256"] == hashlib.sha256(body).hexdigest()
        assert "first download" in spec[name]["note"]
    assert spec["generator"]["uri"] == "stylegan2-ffhq-config-f.pt"

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
