"""The docs tell the truth about what the code has: the tables made from the schemas are
current, and the `maskface` command lines they show use the flags the commands take.
(`make docs` builds the site strictly: broken links and references fail there.)"""
import importlib.util
import re
from pathlib import Path

import pytest

from jobs.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def generate_module():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_tables_are_current_and_a_drifted_one_is_caught():
    generate = generate_module()
    assert generate.main(["--check"]) == 0, "run: python docs/generate.py"
    page = (ROOT / "docs" / "job-spec.md").read_text()
    drifted = page.replace("| `batch_size` | `4` |", "| `batch_size` | `8` |")
    assert drifted != page
    fixed, changed = generate.regenerate(drifted)
    assert changed == ["job-spec"] and fixed == page
    edit_page = (ROOT / "docs" / "editing.md").read_text()
    assert "| `steps.latent` | `1000` |" in edit_page
    assert "| `early_stop.enabled` | `false` |" in edit_page
    assert "| `identity_status` | `string` |" in (ROOT / "docs" / "outputs.md").read_text()


# ---- the command lines -----------------------------------------------------------------
def commands() -> dict[tuple[str, ...], set[str]]:
    """Every command path (`("weights", "fetch")`) and its long options."""
    found: dict[tuple[str, ...], set[str]] = {}

    def walk(parser, path):
        subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
        if path:
            found[path] = flags - {"--help"}
        for sub in subs:
            for name, child in sub.choices.items():
                walk(child, path + (name,))
    walk(build_parser([]), ())
    return found


def documented_lines() -> list[tuple[str, str]]:
    """(page, text) of every `maskface ...` command the docs show: in shell blocks (with
    continuation lines joined, comments dropped) and in inline code."""
    out = []
    for page in PAGES:
        shell, prose, fence = [], [], None
        for line in page.read_text().splitlines():
            if line.startswith("```"):
                fence = None if fence is not None else line[3:].strip()
            elif fence in ("", "bash", "sh"):
                shell.append(line)
            elif fence is None:
                prose.append(line)
        for line in "\n".join(shell).replace("\\\n", " ").splitlines():
            line = line.split(" #")[0]
            if "maskface " in line:
                out.append((page.name, line[line.index("maskface "):]))
        for span in re.findall(r"`(maskface [^`]+)`", "\n".join(prose)):
            out.append((page.name, span))
    return out


def command_of(line: str, known) -> tuple[str, ...] | None:
    words = [w for w in line.split()[1:] if not w.startswith("-")][:2]
    for n in (2, 1):
        if tuple(words[:n]) in known:
            return tuple(words[:n])
    return None


def test_every_flag_of_every_command_is_shown_in_the_docs():
    known = commands()
    shown: dict[tuple[str, ...], set[str]] = {}
    for _, line in documented_lines():
        path = command_of(line, known)
        if path:
            shown.setdefault(path, set()).update(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line))
    missing = []
    for path, flags in known.items():
        siblings = [p for p in known if p[:-1] == path[:-1] and len(p) == len(path)]
        for flag in sorted(flags):
            # an option several subcommands share (manifest's) may be shown on one of them
            if not any(flag in shown.get(p, set()) and flag in known[p] for p in siblings):
                missing.append(f"maskface {' '.join(path)} {flag}")
    assert missing == []


def wrong_flags(lines, known) -> list[str]:
    """What the given command lines show that the commands do not have."""
    wrong = []
    for page, line in lines:
        path = command_of(line, known)
        if path is None:
            if line.split()[1:2] and not line.split()[1].startswith("-"):
                wrong.append(f"{page}: no such command: {line}")
            continue
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line):
            if flag not in known[path] | {"--help", "--verbose"}:
                wrong.append(f"{page}: {flag} is no option of maskface {' '.join(path)}: {line}")
    return wrong


def test_every_flag_the_docs_show_exists():
    assert wrong_flags(documented_lines(), commands()) == []


def test_a_wrong_flag_or_command_is_caught():
    lines = [("x.md", "maskface run JOB.yaml --bogus"), ("x.md", "maskface frobnicate X"),
             ("x.md", "maskface weights fetch --dest w/ --only e4e")]
    assert len(wrong_flags(lines, commands())) == 2
