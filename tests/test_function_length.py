"""No product function or method is longer than 60 lines: the `def` line to the last line
of its body (decorators not counted), in every module of jobs/, manifests/, models/ and
pipeline/. A longer one is split into named steps."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("jobs", "manifests", "models", "pipeline")
MOST_LINES = 60


def long_functions(source: str, most: int = MOST_LINES) -> list[tuple[str, int, int]]:
    """(qualified name, first line, lines) of each function or method over `most` lines."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lines = child.end_lineno - child.lineno + 1
                    if lines > most:
                        found.append((name, child.lineno, lines))
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def test_the_check_finds_a_long_function_and_a_long_method():
    """61 lines counted from `def` (the decorator not), at any depth; 60 pass."""
    def body(lines, indent):
        return "".join(f"{indent}x{i} = {i}\n" for i in range(lines - 1))
    source = ("@decorated\ndef long():\n" + body(61, "    ")           # lines 1-62
              + "def fits():\n" + body(60, "    ")                     # lines 63-122
              + "class C:\n    def method(self):\n" + body(61, "        "))  # 123-184
    assert long_functions(source) == [("long", 2, 61), ("C.method", 124, 61)]


def test_no_product_function_is_longer_than_60_lines():
    too_long = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for name, line, lines in long_functions(path.read_text()):
                too_long.append(f"{path.relative_to(ROOT)}:{line} {name}: {lines} lines")
    assert not too_long, (f"functions over {MOST_LINES} lines (split them into named steps):\n"
                          + "\n".join(too_long))
