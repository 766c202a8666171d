"""The package's layering, read from its source with ast: no private names imported across modules,
no import cycles among the top-level modules (function-local imports included: a cycle hidden in
a function is still two modules that cannot be understood apart)."""

from __future__ import annotations

import ast
from pathlib import Path

import compressor

ROOT = Path(compressor.__file__).parent


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def _imports(name: str, path: Path):
    """(imported module, imported names) for every `from x import ...` and `import x` in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield base, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def test_no_private_names_are_imported_across_modules():
    offences = []
    for name, path in _modules():
        for module, names in _imports(name, path):
            if not module.startswith("compressor") or module == name:
                continue
            offences += [f"{name} imports {module}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    assert offences == []


def _top(module: str) -> str | None:
    """compressor.calibrate.cache -> compressor.calibrate; compressor.surgery.plan -> compressor.surgery.plan."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "compressor" and len(parts) > 1 else None


def test_no_import_cycles_among_top_level_modules():
    graph: dict[str, set[str]] = {}
    for name, path in _modules():
        source = _top(name)
        if source is None:
            continue
        for module, names in _imports(name, path):
            # `from compressor import x` names a submodule x
            targets = [f"compressor.{n}" for n in names] if module == "compressor" else [module]
            for target in filter(None, map(_top, targets)):
                leaf = target.split(".")[1]
                if target != source and ((ROOT / leaf).is_dir() or (ROOT / f"{leaf}.py").exists()):
                    graph.setdefault(source, set()).add(target)
    cycles = []
    for start in sorted(graph):
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    cycles.append(" -> ".join(trail + [start]))
                elif nxt not in seen and nxt > start:  # report each cycle once, from its smallest module
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
    assert cycles == []


def test_no_module_is_over_400_lines():
    long = [f"{name}: {n} lines" for name, path in _modules() if (n := len(path.read_text().splitlines())) > 400]
    assert long == []


def test_every_capability_is_a_top_level_folder_or_module():
    """What the README's table of contents names, a newcomer finds one step below `compressor/`."""
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert {"calibrate", "select", "surgery", "heal", "quantize", "export", "evaluate", "pipeline", "report",
            "cli", "util"} <= folders
    loose = {p.stem for p in ROOT.glob("*.py")} - {"__init__", "__main__"}
    assert loose <= {"api", "errors", "adapters", "loading", "info", "data", "blocks"}, loose
