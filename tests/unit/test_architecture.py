"""The layering of docs/architecture.md, checked against every module's imports (so the rule cannot drift).

The rule is read from the document's tables (import rules, known exceptions); the imports from each module's
syntax tree, including imports inside functions.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from config import PROJECT_ROOT

ARCHITECTURE = PROJECT_ROOT / "docs" / "architecture.md"


def _table_after(marker: str) -> list[list[str]]:
    """The body rows of the Markdown table that follows the HTML comment `marker`, as lists of cells."""
    lines = ARCHITECTURE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"<!-- {marker}"))
    rows = []
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows[2:]  # header and separator


def _names(cell: str) -> set[str]:
    return set(re.findall(r"`?([a-z_]+)`?", cell)) - {"every", "package", "above"} if cell != "—" else set()


def import_rules() -> dict[str, dict]:
    """package → {"layer", "ours" (allowed project packages, or None for any), "banned" (frameworks)}."""
    rules = {}
    for package, layer, ours, banned in _table_after("import-rules"):
        name = package.strip("`")
        rules[name] = {"layer": int(layer), "ours": None if "every package" in ours else _names(ours),
                       "banned": _names(banned)}
    return rules


def known_exceptions() -> set[tuple[str, str]]:
    """(module path, imported package) pairs the document lists as known debts."""
    return {(module.strip("`"), imported.strip("`")) for module, imported, _ in _table_after("import-exceptions")}


def imports_of(path: Path) -> set[str]:
    """Top-level names of every absolute import in the module (anywhere in it, functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def project_modules(rules: dict) -> dict[str, list[Path]]:
    """package → its Python files (packages planned in the document but not written yet have none)."""
    return {package: sorted((PROJECT_ROOT / package).rglob("*.py")) for package in rules}


RULES = import_rules()
OURS = set(RULES)


def test_the_document_names_every_package_of_the_project():
    packages = {p.parent.name for p in PROJECT_ROOT.glob("*/__init__.py")}
    assert packages <= OURS, f"add {sorted(packages - OURS)} to the import rules of {ARCHITECTURE}"
    assert not (PROJECT_ROOT / "kafka" / "__init__.py").exists(), "kafka/ must not be a package (it shadows kafka-python)"


def test_layers_only_point_down():
    for package, rule in RULES.items():
        if rule["ours"] is None:
            continue
        for allowed in rule["ours"]:
            assert RULES[allowed]["layer"] < rule["layer"], f"{package} may import {allowed}, which is not below it"


@pytest.mark.parametrize("package", sorted(RULES))
def test_every_import_follows_the_rules(package):
    rule = RULES[package]
    exceptions = known_exceptions()
    broken = []
    for path in project_modules(RULES)[package]:
        relative = path.relative_to(PROJECT_ROOT).as_posix()
        for name in sorted(imports_of(path)):
            if name in OURS and name != package and rule["ours"] is not None and name not in rule["ours"] \
                    and (relative, name) not in exceptions:
                broken.append(f"{relative} imports {name} (a {package} module may import: "
                              f"{', '.join(sorted(rule['ours'])) or 'nothing of ours'})")
            if name in rule["banned"]:
                broken.append(f"{relative} imports {name}, a framework {package} must not depend on")
    assert not broken, "\n".join(broken) + f"\n(the rules: {ARCHITECTURE})"


def test_every_known_exception_still_exists():
    """A debt that has been paid leaves the list, so the list never hides a new violation."""
    for module, imported in known_exceptions():
        assert imported in imports_of(PROJECT_ROOT / module), \
            f"{module} no longer imports {imported}: remove it from the known exceptions in {ARCHITECTURE}"


def test_nothing_below_the_roof_imports_the_roof():
    roof = max(RULES, key=lambda p: RULES[p]["layer"])
    for package, paths in project_modules(RULES).items():
        if package != roof:
            assert all(roof not in imports_of(p) for p in paths), f"a {package} module imports {roof}"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from orchestration import stack\n    import storage.mongo\n")
    assert imports_of(module) == {"os", "orchestration", "storage"}
