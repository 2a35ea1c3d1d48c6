"""The rules that keep the house simple, proved: which package may import which, no
import circle, and the receiving process never loads torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("lungsys", "pacs_node", "inference", "training", "store", "config")
#: package -> the packages of the design it must never import
FORBIDDEN = {"inference": {"pacs_node", "lungsys", "training", "store"},
             "training": {"pacs_node", "lungsys", "store"},
             "pacs_node": {"training", "lungsys"},
             "store": {"pacs_node", "lungsys", "training", "inference"},
             "config": {"pacs_node", "lungsys", "training", "inference", "store"}}
#: ... but for these (the choices an analysis takes are defined once, in inference)
EXCEPT = {"config": {"inference", "inference.choices",
                     *(f"inference.choices.{name}" for name in (
                         "HeatmapChoice", "PatientMethod", "ResultObject", "SegCompression",
                         "DEFAULT_OBJECTS"))}}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(path: Path, name: str, top_level_only: bool) -> set[str]:
    """The project modules ``path`` imports (at any depth, or only at module level)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:                         # relative import
                package = name.split(".")[:len(name.split(".")) - node.level + (
                    1 if path.name == "__init__.py" else 0)]
                base = ".".join([*package, base] if base else package)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def test_no_package_reaches_where_it_must_not():
    modules = _modules()
    # the walker sees imports inside functions too (the commands import lazily)
    assert "training.evaluate" in _imports(modules["lungsys.train"], "lungsys.train", False)
    wrong = []
    for name, path in modules.items():
        banned = FORBIDDEN.get(name.split(".")[0], set())
        for imported in _imports(path, name, top_level_only=False):
            if imported.split(".")[0] in banned and imported not in EXCEPT.get(
                    name.split(".")[0], ()):
                wrong.append(f"{name} imports {imported}")
    assert wrong == []


def test_there_is_no_import_circle():
    modules = _modules()
    graph = {name: {m for m in _imports(path, name, top_level_only=True) if m in modules
                    and m != name}
             for name, path in modules.items()}
    for name in graph:                             # a package's __init__ is not its modules
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    assert "pacs_node.receiver" in graph["pacs_node.node"]      # the graph is real
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_the_receiving_process_never_loads_torch():
    loaded = _loaded_after("import pacs_node.node, pacs_node.receiver, pacs_node.stow")
    assert "torch" not in loaded and "pacs_node.node" in loaded


def test_the_command_line_refuses_what_cannot_train_or_evaluate_before_loading_torch(
        tmp_path):
    """`lungsys train ...` and `lungsys evaluate` check their settings, the checkpoint they
    read (the shipped model's metadata, here) and the dataset with PyTorch not loaded: a
    misspelt option or path is said in a second or two, not after PyTorch's import."""
    (tmp_path / "s1").mkdir()
    (tmp_path / "manifest.csv").write_text("study,label,split\ns1,covid,train\n")
    data, out = str(tmp_path), str(tmp_path / "m.safetensors")
    shipped, gone = "inference/models/lungsys-small-phantom.safetensors", str(tmp_path / "g")
    refusals = [
        (["train", "slice", "--optimizer", "adamm"], "unknown optimizer 'adamm'"),
        (["train", "slice", "--from-model", shipped, "--level-epochs", "1"],
         "--level-epochs is Hu 2020's first phase"),
        (["train", "volume", "--arch", "m3"], "--arch m3 is a slice model"),
        (["train", "patient", "--slice-model", gone], f"{gone}: no such checkpoint file"),
        (["train", "slice", "--data", gone], f"{gone}: no such folder or file"),
        (["evaluate", "--model", gone, "--split", "train"], f"{gone}: no such checkpoint"),
        (["evaluate", "--model", shipped, "--split", "test"], "no test studies"),
    ]
    commands = []                              # the dataset first: a --data given wins
    for args, _ in refusals:
        where = 2 if args[0] == "train" else 1
        commands.append(["lungsys", *args[:where], "--data", data,
                         *(["--out", out] if args[0] == "train" else []), *args[where:]])
    code = ("import sys\nfrom lungsys.app import main\n"
            f"for sys.argv in {commands!r}:\n"
            "    try:\n        main()\n    except SystemExit as exc:\n"
            "        print(exc.code, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.stdout.split() == ["1", "False"] * len(refusals), proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == len(refusals), proc.stderr
    for line, (args, words) in zip(lines, refusals):
        assert line.startswith("lungsys: error: ") and words in line, (args, line)
    assert not (tmp_path / "m.run").exists()            # no run folder was started


def test_the_model_side_loads_no_node_and_no_command_line():
    names = [n for n in _modules() if n.split(".")[0] in ("inference", "training")
             and not n.endswith("__main__")]
    loaded = _loaded_after("import " + ", ".join(names))
    assert {m for m in loaded if m.split(".")[0] in ("pacs_node", "lungsys")} == set()
    assert "torch" in loaded                       # they were really imported


def test_the_node_loads_no_training_and_no_command_line():
    names = [n for n in _modules() if n.split(".")[0] in ("pacs_node", "store", "config")]
    loaded = _loaded_after("import " + ", ".join(names))
    assert {m for m in loaded if m.split(".")[0] in ("training", "lungsys")} == set()


def test_coded_choices_are_spelled_only_in_their_enums():
    """'network', 'nonparametric', 'dimse' ... appear as string literals only where their
    Enum is defined (other code names the Enum member)."""
    owners = {"network": "inference.choices", "nonparametric": "inference.choices",
              "dimse": "config.targets", "optional": "config", "required": "config",
              "bcp195": "config", "tls13": "config"}
    found = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in owners \
                    and owners[node.value] != name:
                found.append(f"{name}:{node.lineno} {node.value!r}")
    assert found == []


def test_what_the_worker_sends_the_node_loads_nothing_heavy():
    """The node unpickles the worker's ModelInfo: that must not bring highdicom or torch
    into the receiving process (20 MiB more, once)."""
    loaded = _loaded_after("import pickle\nimport pacs_node.node\n"
                           "from inference.model_info import ModelInfo\n"
                           "pickle.loads(pickle.dumps(ModelInfo('v', '2.25.1', 'small', 'x')))")
    assert not {"highdicom", "torch"} & loaded


def test_every_public_class_says_what_it_is():
    missing = [f"{name}.{node.name}" for name, path in _modules().items()
               for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
               if isinstance(node, ast.ClassDef) and not node.name.startswith("_")
               and ast.get_docstring(node) is None]
    assert missing == []


def test_the_readme_points_nowhere_outside_the_repository():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "../" not in text and len(text.splitlines()) < 150
    for link in ("docs/admin.md", "docs/architecture.md", "docs/cli.md", "docs/model.md",
                 "docs/specification.md", "docs/conformance.md"):
        assert link in text and (ROOT / link).is_file()
