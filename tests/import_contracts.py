"""An import-linter contract type the built-in ones lack: an allow-list.

    [[tool.importlinter.contracts]]
    type = "allowed"
    source_modules = ["pipeline.engine"]
    allowed_modules = ["torch", "numpy", "models", "pipeline.errors", "pipeline.store.uris"]

Every module of a source package may import, directly, only: its own package, the
standard library and the allowed modules (each with its submodules). pyproject.toml
registers it (`contract_types`); `lint-imports` runs from the repo root, which it puts
on sys.path.
"""
from __future__ import annotations

import sys

from importlinter import Contract, ContractCheck, fields, output


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


class AllowedContract(Contract):
    type_name = "allowed"

    source_modules = fields.ListField(subfield=fields.ModuleField())
    allowed_modules = fields.ListField(subfield=fields.StringField())

    def check(self, graph, verbose: bool) -> ContractCheck:
        allowed = [str(m) for m in self.allowed_modules]  # type: ignore[attr-defined]
        illegal = []
        for source in self.source_modules:                # type: ignore[attr-defined]
            package = source.name
            for importer in sorted({package, *graph.find_descendants(package)}):
                for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                    if (_within(imported, package)
                            or imported.split(".")[0] in sys.stdlib_module_names
                            or any(_within(imported, a) for a in allowed)):
                        continue
                    lines = graph.get_import_details(importer=importer, imported=imported)
                    illegal.append((importer, imported,
                                    sorted({d["line_number"] for d in lines})))
        return ContractCheck(kept=not illegal, metadata={"illegal": illegal})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for importer, imported, lines in check.metadata["illegal"]:
            output.print_error(f"{importer} -> {imported} (l.{', '.join(map(str, lines))}) "
                               "is not on the allow-list", bold=False)
            output.new_line()
