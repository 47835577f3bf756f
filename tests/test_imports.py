"""The package's folders are its stages, and imports flow one way: the top-level modules (config, fileio, dist,
stop, cli) -> formats -> embedding -> training -> use. A module imports its own layer or lower ones, never a
higher one; the demo builders import only the top level, and nothing in the library imports them. Read from the
source with `ast` (imports inside functions count too), so nothing is imported to check it."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "minivlm"
LAYERS = {"": 0, "formats": 1, "embedding": 2, "training": 3, "use": 4}  # "": the top-level modules
DEMO = "demo"


def layer_of(module: str) -> str:
    """'minivlm.training.data' -> 'training'; 'minivlm.config', 'minivlm.__version__' -> '' (the top level)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in {*LAYERS, DEMO} else ""


def imported(source: str, module: str) -> set[str]:
    """The minivlm names `source` (the text of `module`) imports, relative imports resolved:
    `from minivlm.embedding import shard` -> minivlm.embedding.shard."""
    package, out = module.split(".")[:-1], set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            base = ".".join(base + ([node.module] if node.module else []))
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m.split(".")[0] == "minivlm"}


def violations(module: str, source: str) -> list[str]:
    """Each import of `module` that goes against the one-way rule."""
    here, out = layer_of(module), []
    for target in sorted(imported(source, module)):
        there = layer_of(target)
        if here == DEMO:
            ok = there in ("", DEMO)
        else:
            ok = there != DEMO and LAYERS[there] <= LAYERS[here]
        if not ok:
            out.append(f"{module} imports {target} ({there or 'top level'} above {here or 'top level'})")
    return out


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def test_every_package_folder_is_a_layer_or_the_demo():
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert folders == {*(n for n in LAYERS if n), DEMO}


def test_no_module_imports_a_higher_layer_and_the_demo_imports_only_the_top_level():
    found = [v for path in sorted(PACKAGE.rglob("*.py"))
             for v in violations(module_name(path), path.read_text(encoding="utf-8"))]
    assert found == []


def test_the_check_catches_an_upward_import():
    """A formats module that reaches into training, an embedding module importing `use` relatively, a library
    module importing the demo, and a demo builder importing stage 1: each one is named."""
    cases = {
        "minivlm.formats.records": "from minivlm.training.text import tokenize\n",
        "minivlm.embedding.cache": "def f():\n    from ..use import export\n",
        "minivlm.training.data": "import minivlm.demo.folder\n",
        "minivlm.demo.tars": "from minivlm.embedding import shard\n",
        "minivlm.config": "from minivlm import formats\n",
    }
    for module, source in cases.items():
        assert len(violations(module, source)) == 1, module
    assert violations("minivlm.use.export", "from minivlm.training.model import VLM\nfrom minivlm import fileio\n"
                      "from . import generate\n") == []
