"""The import graph ARCHITECTURE.md describes, checked on the source: imports run downwards only,
the ground floor of ``pipelines/`` imports no stage, stages do not import each other (the known
exceptions listed, so a new one fails here), no cycle, no private name imported across modules,
and every import of our code goes through the one ``cohortflow`` package."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = ("pipelines", "models", "qc", "flows")
#: the shared parts of pipelines/ every stage builds on (ARCHITECTURE.md, "Layers")
GROUND = {"safeio", "walk", "dicomfolder", "dicom", "imaging", "atlas", "archive", "pacs"}
#: the orchestration of a protocol run: it imports every stage on purpose
ORCHESTRATION = {"run"}
#: stage -> stage imports still there (ARCHITECTURE.md, "Not there yet"): remove one from the
#: code and from here; never add one
KNOWN_SIDEWAYS = {
    ("cohort", "retrieve"),  # a cohort's studies not yet archived are retrieved
    ("cohort", "select"),  # a cohort becomes a selection
    ("retrieve", "ingest"),  # what is retrieved is ingested
    ("retrieve", "select"),  # retrieval asks the PACS with the selection's query
    ("synth", "quality"),  # the synthetic cohort's QC is scored against its truth
    ("volumetry", "convert"),  # a DICOM folder is converted before it is measured
}


def _imported(node: ast.AST) -> list[str]:
    """The modules an import statement names (none for anything else or a relative import)."""
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return []


def _imports() -> Iterator[tuple[str, str, str]]:
    """(file, importing module, imported module) for every import of our packages."""
    for top in OURS:
        for path in sorted((ROOT / top).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(
                ".__init__"
            )
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                for name in _imported(node):
                    inside = name.removeprefix("cohortflow.")
                    if inside != name and inside.split(".")[0] in OURS:
                        yield str(path.relative_to(ROOT)), module, inside


IMPORT_IN_TEXT = rf"\b(?:from|import) ((?:{'|'.join(OURS)})\.[\w.]+)"


def test_every_import_of_our_code_goes_through_the_cohortflow_package() -> None:
    """The installed distribution holds the layers under ``cohortflow`` only (pyproject.toml):
    an import of ``pipelines`` or ``flows`` ... by its bare name works in a checkout and breaks
    once installed (or finds another distribution's module of that name)."""
    bare = []
    for top in (*OURS, "tests", "benchmarks", "scripts", "cohortflow"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.is_symlink() or any(p.is_symlink() for p in path.parents):
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [n for n in _imported(node) if n.split(".")[0] in OURS]
                # ... and in code handed to another interpreter (python -c, a child's script)
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    names += [f"{n} (in a string)" for n in re.findall(IMPORT_IN_TEXT, node.value)]
                bare += [f"{path.relative_to(ROOT)}: {n}" for n in names]
    assert [b for b in bare if b not in BARE_ON_PURPOSE] == []


#: bare names that are meant: the end-to-end benchmark runs a baseline checkout from before the
#: ``cohortflow`` namespace through that checkout's own command line
BARE_ON_PURPOSE = {"benchmarks/end_to_end.py: flows.cli (in a string)"}


def _unit(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "pipelines" and len(parts) > 1:
        return f"pipelines.{parts[1]}"
    if parts[:2] == ["qc", "dashboard"]:
        return "qc.dashboard"
    return parts[0]


def test_imports_run_downwards_only() -> None:
    allowed = {
        "models": {"models"},
        "qc": {"models", "qc"},
        "qc.dashboard": {"models", "qc", "qc.dashboard"},
    }
    wrong = []
    for path, module, name in _imports():
        source, target = _unit(module), _unit(name)
        if source in allowed and target not in allowed[source]:
            wrong.append(f"{path}: {name}")
        if source.startswith("pipelines") and target == "flows":
            wrong.append(f"{path}: {name}")
    assert wrong == []


def test_the_ground_floor_imports_no_stage_and_stages_not_each_other() -> None:
    sideways: dict[tuple[str, str], list[str]] = {}
    for path, module, name in _imports():
        source, target = _unit(module), _unit(name)
        if not (source.startswith("pipelines.") and target.startswith("pipelines.")):
            continue
        a, b = source.split(".")[1], target.split(".")[1]
        if a == b or b in GROUND or a in ORCHESTRATION:
            continue
        assert a not in GROUND, f"{path}: the ground floor imports the stage {name}"
        sideways.setdefault((a, b), []).append(f"{path}: {name}")
    new = {pair: where for pair, where in sideways.items() if pair not in KNOWN_SIDEWAYS}
    assert new == {}, "a stage imports another: move what they share to the ground floor"
    gone = KNOWN_SIDEWAYS - set(sideways)
    assert gone == set(), f"no longer imported: take {gone} out of KNOWN_SIDEWAYS"


def test_no_import_cycle_between_packages() -> None:
    edges: dict[str, set[str]] = {}
    for _, module, name in _imports():
        if _unit(module) != _unit(name):
            edges.setdefault(_unit(module), set()).add(_unit(name))

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            for nxt in edges.get(node, ()):
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    cycles = sorted(f"{a} <-> {b}" for a, to in edges.items() for b in to if reaches(b, a))
    assert cycles == []


def test_no_private_name_is_imported_across_modules() -> None:
    private = []
    for top in OURS:
        for path in sorted((ROOT / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.module:
                    private += [
                        f"{path.relative_to(ROOT)}: {node.module}.{a.name}"
                        for a in node.names
                        if a.name.startswith("_") and node.module.split(".")[0] in OURS
                    ]
    assert private == []
