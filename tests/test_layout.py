"""The layout a newcomer reads: each module named where its folder is described."""
import importlib
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("models", "pipeline", "jobs", "manifests")


def modules(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.py") if p.name != "__init__.py")


def test_the_architecture_page_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    layout = text[text.index("## The packages"):]
    layout = layout[:layout.index("\n## ", 1)]
    missing = [f"{folder.relative_to(ROOT)}/{name}" for pkg in PACKAGES
               for folder in [ROOT / pkg, *sorted((ROOT / pkg).glob("*/"))]
               if (folder / "__init__.py").exists() or folder == ROOT / pkg
               for name in modules(folder) if f"`{name}`" not in layout]
    assert missing == []


def test_pipeline_is_three_rooms_each_listing_its_modules():
    assert modules(ROOT / "pipeline") == ["errors.py"]
    rooms = sorted(p.name for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").exists())
    assert rooms == ["engine", "job", "results"]
    for room in rooms:
        doc = importlib.import_module(f"pipeline.{room}").__doc__
        assert [m for m in modules(ROOT / "pipeline" / room) if m not in doc] == [], room
        assert "May import" in doc or "may import" in doc, room
