"""What the docs' cluster page, the Dockerfile, cluster.yaml and the KubeRay RayJob say,
parsed, so tests can hold them to each other and run the page's own commands."""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def cluster_page() -> str:
    return (REPO / "docs" / "cluster.md").read_text()


def shell_commands(section: str) -> list[str]:
    """The commands of the section's ```bash blocks, continuation lines joined,
    comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                commands.append(line)
    return commands


@dataclass
class Submit:
    address: str
    runtime_env: dict
    entrypoint: list[str]


def page_submits() -> list[Submit]:
    """Every `ray job submit` of the cluster page, in order."""
    out = []
    for cmd in shell_commands(cluster_page()):
        words = shlex.split(cmd)
        if words[:3] != ["ray", "job", "submit"]:
            continue
        sep = words.index("--")
        opts, entry = words[3:sep], words[sep + 1:]
        address = opts[opts.index("--address") + 1]
        env = json.loads(opts[opts.index("--runtime-env-json") + 1])
        out.append(Submit(address, env, entry))
    return out


def page_image() -> str:
    """The tag of the cluster page's `docker build -t TAG .`."""
    for cmd in shell_commands(cluster_page()):
        words = shlex.split(cmd)
        if words[:2] == ["docker", "build"]:
            return words[words.index("-t") + 1]
    raise AssertionError("the cluster page has no `docker build -t`")


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def cluster_yaml() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def rayjob() -> dict:
    return yaml.safe_load((REPO / "jobs" / "kuberay-rayjob.yaml").read_text())


def pinned_ray() -> str:
    """The Ray version pyproject.toml pins (the one place)."""
    import tomllib
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    rays = [d for d in deps if re.match(r"ray(\[|\s|=|$)", d)]
    assert len(rays) == 1, rays
    m = re.fullmatch(r"ray\[[a-z,]+\]==(\d+\.\d+\.\d+)", rays[0].replace(" ", ""))
    assert m, f"pyproject.toml must pin ray exactly, got {rays[0]!r}"
    return m.group(1)
