"""The architecture's import directions, read from the sources (every import statement, also those inside
functions): the folders depend one way (launcher on everything; parallel on model and kernels; model on
kernels), and inside parallel/ each part imports only the parts below it in LAYERS, as the sub-packages'
docstrings say. A back edge fails with the file and line that made it."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("launcher", "model", "parallel", "data", "kernels")

# What each folder may import of the others.
FOLDER_DEPENDS = {
    "launcher": {"data", "model", "parallel", "kernels"},
    "parallel": {"model", "kernels"},
    "model": {"kernels"},
    "data": set(),
    "kernels": set(),
}

# parallel/'s parts, lowest first: the foundation modules, then the sub-packages in the order they build on
# each other (context may compose with the TP forms; plan reads the TP split rules; the engine builds the TP,
# CP and pipeline forms; checkpoints rebuild and restore engines).
LAYERS = ["config", "layout", "distributed", "topology", "guard", "tensor", "context", "pipeline", "plan", "engine",
          "checkpoint"]


def module_name(path: Path) -> str:
    return "strata." + ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path):
    """(line, imported dotted name) of every import in the file; `from a import b` yields a and a.b."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            yield from ((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)


def part(dotted: str) -> tuple[str, str] | None:
    """('parallel', 'tensor') for strata.parallel.tensor.splits, ('model', '') for strata.model.hybrid."""
    pieces = dotted.split(".")
    if pieces[0] != "strata" or len(pieces) < 2 or pieces[1] not in FOLDERS:
        return None
    inner = pieces[2] if pieces[1] == "parallel" and len(pieces) > 2 else ""
    return pieces[1], inner


def sources():
    for folder in FOLDERS:
        yield from sorted((REPO / folder).rglob("*.py"))


def test_folders_import_one_way():
    back = []
    for path in sources():
        folder, _ = part(module_name(path))
        for line, name in imports(path):
            target = part(name)
            if target and target[0] != folder and target[0] not in FOLDER_DEPENDS[folder]:
                back.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not back, "imports against the folders' direction:\n" + "\n".join(back)


def test_every_part_of_parallel_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in (REPO / "parallel").iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").is_file())}
    assert parts == set(LAYERS), "add the new part of parallel/ to LAYERS, where it belongs"


def test_parallel_parts_import_only_the_parts_below_them():
    back = []
    for path in (REPO / "parallel").rglob("*.py"):
        _, own = part(module_name(path))
        for line, name in imports(path):
            target = part(name)
            if target and target[0] == "parallel" and target[1] and target[1] != own:
                if LAYERS.index(target[1]) > LAYERS.index(own):
                    back.append(f"{path.relative_to(REPO)}:{line} ({own}) imports {name} ({target[1]}, above it)")
    assert not back, "back edges in parallel/:\n" + "\n".join(back)


def test_the_check_sees_a_back_edge(tmp_path):
    """The reader above finds imports inside functions too, which is where a back edge would hide."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from strata.parallel.checkpoint.files import MANIFEST\n")
    assert ("strata.parallel.checkpoint.files" in {name for _, name in imports(module)}
            and part("strata.parallel.checkpoint.files") == ("parallel", "checkpoint"))
