import logging
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(min(2, os.cpu_count() or 1))


class LongRecords(logging.Handler):
    """Every log record at WARNING or above whose message passes MAX_MESSAGE bytes
    (pipeline/errors.py): a hostile value quoted whole in a warning or an error. Only
    WARNING and above: those are the lines that quote inputs, and a long debug or info
    line of a library (a cluster's description, a request's dump) is not a defect."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        from pipeline.errors import MAX_MESSAGE
        try:
            message = record.getMessage()
        except Exception:         # noqa: BLE001 -- a broken record is logging's to report
            return
        size = len(message.encode("utf-8", "replace"))
        if size > MAX_MESSAGE:
            self.found.append(f"{record.name} {record.levelname}: {size:,} bytes: "
                              f"{message[:200]}")


LONG_RECORDS = LongRecords()


@pytest.fixture(autouse=True)
def no_long_log_lines():
    """Fails (at teardown) the test during which a log line of WARNING or above passed
    MAX_MESSAGE bytes: no message over 2 KB, whatever the suite provokes."""
    root = logging.getLogger()
    if LONG_RECORDS not in root.handlers:
        root.addHandler(LONG_RECORDS)
    LONG_RECORDS.found.clear()
    yield
    found, LONG_RECORDS.found[:] = list(LONG_RECORDS.found), []
    if found:
        pytest.fail(f"{len(found)} log line(s) over 2 KB:\n" + "\n".join(found[:5]),
                    pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Keep the node-local cache (copied checkpoints, mean latents) out of $HOME."""
    path = tmp_path_factory.mktemp("maskface-cache")
    old = os.environ.get("MASKFACE_CACHE")
    os.environ["MASKFACE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MASKFACE_CACHE", None)
    else:
        os.environ["MASKFACE_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A complete tiny checkpoint set (64 px) written by `make_tiny`, with its models.yaml."""
    from models.tiny import make_tiny
    out = tmp_path_factory.mktemp("tiny64")
    make_tiny(out, resolution=64, seed=0)
    return out


@pytest.fixture(scope="module")
def tiny_models(tiny_dir):
    """The 64 px tiny networks loaded (the parser at 64), once per test module."""
    from models.loaders import load_models
    from models.spec import read_spec
    return load_models(read_spec(str(tiny_dir / "models.yaml")), parser_size=64)


@pytest.fixture(scope="session")
def tiny32(tmp_path_factory):
    """The tiny checkpoint set at 32 px: the job tests' models."""
    from models.tiny import make_tiny
    out = tmp_path_factory.mktemp("tiny32")
    make_tiny(out, resolution=32)
    return out


@pytest.fixture(scope="session")
def reference_checkpoints(tmp_path_factory):
    """The deterministic checkpoints the shared fidelity cases were recorded with."""
    from helpers import write_reference_checkpoints
    return write_reference_checkpoints(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="session")
def fidelity_checkpoints(reference_checkpoints, tmp_path_factory):
    """Every checkpoint the global and noise fidelity cases were recorded with: the three
    reference ones, the e4e `state.pt` and the VGG16 trunk rebuilt from the cases' rules,
    and the lpips package's own linear layers, each checked against the sha256 of every
    case that names it before anything is compared (a mismatch fails naming the file).
    Keys: the spec's network names, plus `lpips_linear`."""
    import numpy as np
    from helpers import (FIDELITY_GLOBAL, FIDELITY_NOISE, check_case_hashes,
                         write_global_checkpoints)

    from models.lpips_masked import lpips_linear_file
    mean = torch.from_numpy(np.load(FIDELITY_GLOBAL / "latent_mean.npy"))
    paths = {**reference_checkpoints,
             **write_global_checkpoints(tmp_path_factory.mktemp("reference-global"), mean),
             "lpips_linear": lpips_linear_file()}
    by_name = {p.name: p for p in paths.values()}
    for case in sorted([*FIDELITY_GLOBAL.glob("*/case.json"), *FIDELITY_NOISE.glob("*/case.json")]):
        check_case_hashes(case, by_name)
    return paths


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (moto) on 127.0.0.1, with a bucket `weights`."""
    from moto.server import ThreadedMotoServer
    import s3fs
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("weights")
    yield {"endpoint": endpoint, "options": options, "fs": fs}
    server.stop()


@pytest.fixture(scope="module")
def ray_multinode():
    """A real multi-node Ray cluster on this machine (tests/ray_cluster.py): a head (1 CPU,
    no GPU) and two workers (1 CPU, 1 logical GPU each), token auth on, free ports, its own
    temp dirs; stopped by its own process ids. Module-scoped: a test that removes a worker
    (`remove_worker`) leaves this module's cluster smaller; `add_worker()` adds one back."""
    from ray_cluster import LocalRayCluster
    # a lost node is declared dead after 5 missed health checks: 1 s apart, not Ray's 3
    with LocalRayCluster(workers=2, worker_gpus=1,
                         env={"RAY_health_check_period_ms": "1000"}) as cluster:
        yield cluster
