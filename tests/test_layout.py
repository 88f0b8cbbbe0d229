"""The package's layers import only downward (README, "Code layout"), read from each module's imports."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "coremerge"

# Layer of each top-level part of the package; a module may import its own layer and the ones below.
LAYERS = {
    "errors": 0, "version": 0,
    "formats": 1,
    "merging": 2,
    "presets": 3, "bundled": 3,
    "comparison": 4,
    "webapp": 5,
    "cli": 6, "__main__": 6, "__init__": 6,
}


def part_of(dotted: str) -> str:
    """'coremerge.formats.sources' -> 'formats'; 'coremerge' (the package itself) -> '__init__'."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def imported_modules(path: Path, name: str = "") -> list[tuple[int, str]]:
    """(line, absolute module name) of every coremerge import in the file, function-level ones too."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                targets = [target] if node.module else [f"{target}.{alias.name}" for alias in node.names]
            else:
                targets = [node.module or ""]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, t) for t in targets if t == "coremerge" or t.startswith("coremerge.")]
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_part_of_the_package_has_a_layer():
    assert {part_of(module_name(path)) for path in MODULES} == set(LAYERS)


def upward_imports(path: Path, name: str = "") -> list[str]:
    own = part_of(name or module_name(path))
    return [f"line {line}: {target}" for line, target in imported_modules(path, name)
            if LAYERS[part_of(target)] > LAYERS[own]]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_downward(path):
    assert not upward_imports(path), f"{path.relative_to(PACKAGE)} imports a layer above its own"


def test_the_check_finds_upward_imports(tmp_path):
    """Relative, absolute and function-level imports of a higher layer are all found."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ..merging.spaces import merge_module\nfrom . import sources\n"
                     "def late():\n    import coremerge.webapp.cache\n")
    assert upward_imports(probe, "coremerge.formats.probe") == [
        "line 1: coremerge.merging.spaces", "line 4: coremerge.webapp.cache"]
    assert upward_imports(probe, "coremerge.webapp.probe") == []


def resolves(target: str) -> bool:
    """Whether 'coremerge.x.y' (or 'coremerge.x.name' for a name imported from a package) is in the tree."""
    path = PACKAGE.parent.joinpath(*target.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file() or \
        path.parent.with_suffix(".py").is_file() or (path.parent / "__init__.py").is_file()


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_import_names_a_module_that_exists(path):
    """Function-level imports are only run when called; a moved module must not leave one dangling."""
    missing = [f"line {line}: {target}" for line, target in imported_modules(path) if not resolves(target)]
    assert not missing, f"{path.relative_to(PACKAGE)} imports modules that do not exist: {missing}"
