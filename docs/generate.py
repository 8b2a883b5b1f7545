"""The docs' tables, made from the code's own schemas, so that they cannot drift.

    python docs/generate.py           rewrite every generated block in docs/*.md
    python docs/generate.py --check   exit 1, naming the blocks, when one is out of date

A generated block sits between `<!-- generated: NAME -->` and `<!-- end: NAME -->`; what
lies between them is this script's, the prose around them is the page's. `make docs`
runs the check before it builds the site, and tests/test_docs.py runs it too.
"""
from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Callable, Iterable

DOCS = Path(__file__).resolve().parent
BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z-]+) -->\n)(?P<body>.*?)(<!-- end: (?P=name) -->)",
                   re.S)


def _value(value: Any) -> str:
    """A default as a job spec would write it (YAML)."""
    if value is MISSING:
        return "required"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value}`"
    return f"`{value}`"


def _table(head: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def job_spec() -> str:
    from pipeline.runner.spec import keys
    return _table(("key", "default", "meaning"),
                  ((f"`{k.name}`", _value(k.default), k.help) for k in keys()))


def _fields(cls, prefix: str) -> str:
    return _table(("key", "default", "meaning"),
                  ((f"`{prefix}.{f.name}`", _value(f.default), f.metadata["help"])
                   for f in dataclasses.fields(cls)))


def job_spec_inputs() -> str:
    from pipeline.runner.access import InputPolicy
    fields = sorted(dataclasses.fields(InputPolicy), key=lambda f: f.name != "allow")
    return _table(("key", "default", "meaning"),
                  ((f"`inputs.{f.name}`", _value(f.default), f.metadata["help"])
                   for f in fields))


def job_spec_runtime() -> str:
    from pipeline.engine.runtime import Runtime
    return _fields(Runtime, "runtime")


def edit_settings() -> str:
    from pipeline.engine.settings import SCHEMA
    return _table(("key", "default", "meaning"),
                  ((f"`{key}`", "the models spec's" if info.default is None
                    else _value(info.default), info.help) for key, info in SCHEMA.items()))


def metrics_columns() -> str:
    from pipeline.output.metrics import METRICS_COLUMNS
    return _table(("column", "type", "what it holds"),
                  ((f"`{name}`", f"`{kind}`", doc) for name, kind, doc in METRICS_COLUMNS))


GENERATORS: dict[str, Callable[[], str]] = {
    "job-spec": job_spec, "job-spec-inputs": job_spec_inputs,
    "job-spec-runtime": job_spec_runtime, "edit-settings": edit_settings,
    "metrics-columns": metrics_columns,
}


def regenerate(text: str) -> tuple[str, list[str]]:
    """The page with every generated block made anew, and the names of those that changed."""
    changed: list[str] = []

    def fill(m: re.Match) -> str:
        name = m.group("name")
        if name not in GENERATORS:
            raise SystemExit(f"unknown generated block {name!r}; known: {', '.join(GENERATORS)}")
        body = GENERATORS[name]()
        if body != m.group("body"):
            changed.append(name)
        return m.group(1) + body + m.group(4)
    return BLOCK.sub(fill, text), changed


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale, seen = [], set()
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        seen.update(m.group("name") for m in BLOCK.finditer(text))
        new, changed = regenerate(text)
        if changed:
            stale += [f"{page.name}: {name}" for name in changed]
            if not check:
                page.write_text(new)
    missing = sorted(set(GENERATORS) - seen)
    if missing:
        print(f"no page holds the generated block(s) {', '.join(missing)}", file=sys.stderr)
        return 1
    if stale:
        verb = "out of date (run: python docs/generate.py)" if check else "rewritten"
        print("\n".join(f"{s}: {verb}" for s in stale), file=sys.stderr)
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.path.insert(0, str(DOCS.parent))
    sys.exit(main(sys.argv[1:]))
