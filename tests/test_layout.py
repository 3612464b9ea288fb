"""The tree shows its two layers (issue 19): the library at the package root, the experiment in
``offprincipal/experiment/``. Read from the import statements, not from a list kept by hand."""

import ast
from pathlib import Path

import offprincipal

PACKAGE = Path(offprincipal.__file__).parent
KERNELS = PACKAGE.parent / "kernels"  # installed as offprincipal.kernels


def _module_name(path: Path) -> str:
    if path.is_relative_to(KERNELS):
        parts = ["offprincipal", "kernels", *path.relative_to(KERNELS).with_suffix("").parts]
    else:
        parts = ["offprincipal", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every offprincipal module a file imports (relative imports resolved; ``from X import y`` counts X and X.y)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m.startswith("offprincipal")}


def _sources():
    return {_module_name(p): p for p in [*PACKAGE.rglob("*.py"), *KERNELS.rglob("*.py")]}


def _is_experiment(module: str) -> bool:
    return module.startswith("offprincipal.experiment") or module == "offprincipal.cli"


def test_the_library_never_imports_the_experiment():
    bad = {m: sorted(i for i in _imports(p) if _is_experiment(i))
           for m, p in _sources().items() if not _is_experiment(m)}
    assert not {m: i for m, i in bad.items() if i}


def test_every_root_module_is_used_by_the_library():
    """No module or package at the package root is imported only by the experiment layer, the CLI or the
    benchmarks: each is imported by some library module outside itself (the package ``__init__`` included)."""
    sources = _sources()
    roots = {f"offprincipal.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "cli")}
    roots |= {f"offprincipal.{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    roots |= {"offprincipal.kernels"}
    roots -= {"offprincipal.experiment"}

    def inside(module: str, root: str) -> bool:
        return module == root or module.startswith(root + ".")

    unused = sorted(
        root for root in roots
        if not any(any(inside(i, root) for i in _imports(path))
                   for module, path in sources.items() if not _is_experiment(module) and not inside(module, root))
    )
    assert not unused, f"root modules used only above the library: {unused}"
