"""The layout a newcomer reads: docs/architecture.md's module tables match the tree, each
room's docstring lists its modules, and storage is opened only through its room."""
import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("models", "pipeline", "jobs", "manifests")
ROOMS = ["bench", "engine", "output", "results", "runner", "store"]
STORAGE_LIBRARIES = ("fsspec", "s3fs", "botocore")


def modules(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.py") if p.name != "__init__.py")


def documented_tables() -> dict[str, set[str]]:
    """{folder: the modules its table names} from docs/architecture.md's packages section:
    a `**`folder/`**` line, then a table whose first column names modules."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("## The packages"):]
    section = section[:section.index("\n## ", 1)]
    tables: dict[str, set[str]] = {}
    folder = None
    for line in section.splitlines():
        heading = re.match(r"\*\*`([\w/]+)/`\*\*", line)
        if heading:
            folder = heading.group(1)
            tables[folder] = set()
        elif folder and line.startswith("| `"):
            first = line.split("|")[1]
            tables[folder].update(re.findall(r"`([\w]+\.py)`", first))
    return tables


def test_the_architecture_tables_match_the_tree():
    """Every module of every package folder is in its folder's table, and every module a
    table names exists: a module added, moved or deleted without the page fails here."""
    tables = documented_tables()
    folders = [ROOT / pkg for pkg in PACKAGES if pkg != "pipeline"]
    folders += [ROOT / "pipeline" / room for room in ROOMS]
    tree = {str(f.relative_to(ROOT)): set(modules(f)) for f in folders}
    assert sorted(tables) == sorted(tree)
    for folder, names in tree.items():
        assert sorted(names - tables[folder]) == [], f"{folder}: modules the page omits"
        assert sorted(tables[folder] - names) == [], f"{folder}: the page names modules gone"


def test_pipeline_is_its_rooms_each_listing_its_modules():
    assert modules(ROOT / "pipeline") == ["errors.py"]
    rooms = sorted(p.name for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").exists())
    assert rooms == ROOMS
    for room in rooms:
        doc = importlib.import_module(f"pipeline.{room}").__doc__
        assert [m for m in modules(ROOT / "pipeline" / room) if m not in doc] == [], room
        assert "May import" in doc or "may import" in doc, room


def imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_only_the_storage_room_imports_storage_libraries():
    """Every module outside pipeline/store/ opens URIs through it (the retry policy and
    timeouts): an import of fsspec, s3fs or botocore anywhere else, at any depth of a
    function, fails here (lint-imports' storage contracts say the same)."""
    store = ROOT / "pipeline" / "store"
    offenders = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if store in path.parents:
                continue
            found = {n for n in imported_names(path) if n.split(".")[0] in STORAGE_LIBRARIES}
            if found:
                offenders.append(f"{path.relative_to(ROOT)}: {sorted(found)}")
    assert offenders == []
    assert "fsspec" in imported_names(store / "storage.py")      # the check can see one
