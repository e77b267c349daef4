"""The package's shape: the core has no import cycle, and the products in `slimtune.apps` use only
the public API (the names `slimtune` exports and its public modules)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pyext"
PUBLIC = {
    "slimtune",
    "slimtune.registry",
    "slimtune.architectures",
    "slimtune.ops",
    "slimtune.layers",
    "slimtune.files",
    "slimtune.models",
    "slimtune.targets",
    "slimtune.transaction",
    "slimtune.diagnostics",
    "slimtune.corda",
    "slimtune.prompt",
    "slimtune.seeding",
    "slimtune.sharding",
    "slimtune.toolbox",
    "slimtune.toolbox.graft",
    "slimtune.toolbox.hft",
    "slimtune.toolbox.lines",
    "slimtune.toolbox.fpf",
    "slimtune.toolbox.ltsft",
    "slimtune.toolbox.params",
}


def module_name(path: Path) -> str:
    parts = ["slimtune", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Absolute names of the slimtune modules `path` imports at module level (not under TYPE_CHECKING)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("slimtune")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.startswith("slimtune"):
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules and m != name}


def test_no_import_cycle_in_the_core_or_the_products() -> None:
    graph = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}
    # A package's __init__ importing its submodules is not a cycle of the submodules themselves.
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    visiting, done = set(), set()

    def visit(node: str, path: list[str]) -> None:
        assert node not in visiting, f"import cycle: {' -> '.join([*path, node])}"
        if node in done:
            return
        visiting.add(node)
        for dep in sorted(graph.get(node, ())):
            visit(dep, [*path, node])
        visiting.discard(node)
        done.add(node)

    for node in sorted(graph):
        visit(node, [])


def test_products_use_only_the_public_api() -> None:
    for path in (PACKAGE / "apps").rglob("*.py"):
        core = {m for m in imports(path) if not m.startswith("slimtune.apps")}
        assert core <= PUBLIC, f"{path.relative_to(PACKAGE)} imports {sorted(core - PUBLIC)}"


def test_core_does_not_import_products() -> None:
    for path in PACKAGE.rglob("*.py"):
        if "apps" not in path.parts and path.name != "__main__.py":
            assert not {m for m in imports(path) if m.startswith("slimtune.apps")}, path


def test_the_library_runs_without_the_apps_extra() -> None:
    """`pip install slimtune` has no matplotlib or peft (the `apps` extra; tqdm and pyyaml come with
    transformers): the library imports, patches, trains a step, saves and loads without them."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules.update(dict.fromkeys(['matplotlib', 'peft'], None)); "
        "sys.path.insert(0, 'tests'); import tempfile, slimtune, torch; "
        "from tiny_models import make_batch, make_model; "
        "m = slimtune.apply(make_model('llama'), slimtune.PaCAConfig(r=4)); ids = make_batch(); "
        "m(input_ids=ids, labels=ids).loss.backward(); d = slimtune.save(m, tempfile.mkdtemp()); "
        "slimtune.load(make_model('llama'), d); "
        "assert not {'matplotlib', 'peft'} & {k for k, v in sys.modules.items() if v is not None}"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
