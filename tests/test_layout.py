"""The layout's contract: imports between the five packages point one way, no two modules import each other
(directly or around a loop), and the storage package loads without the model code.

    trainers -> inference -> distill -> lora_experts -> registry

A package may import only the packages to its right. Every import counts, including the ones inside functions
(a lazy import that goes against the order is still a dependency, and a lazy cycle is still a cycle).
"""

from __future__ import annotations

import ast
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["trainers", "inference", "distill", "lora_experts", "registry"]


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the five packages."""
    found = {}
    for package in ORDER:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ours that ``name`` imports anywhere in its file (``from a import b`` counts ``a.b`` when
    that is a module, else ``a``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # `if TYPE_CHECKING:` imports exist for annotations only
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a package attribute: the longest module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_imports_point_one_way():
    wrong = []
    for name, targets in graph().items():
        rank = ORDER.index(name.split(".")[0])
        for target in sorted(targets):
            if ORDER.index(target.split(".")[0]) < rank:
                wrong.append(f"{name} imports {target}")
    assert not wrong, ("imports against trainers -> inference -> distill -> lora_experts -> registry:\n  "
                       + "\n  ".join(wrong))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "modules that import each other: " + "; ".join(" <-> ".join(c) for c in found)


def test_cycle_finder_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_registry_reads_packs_without_model_code():
    code = ("import sys, registry.packs, registry.store, registry.expert_file\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('peft', 'lora_experts', 'distill', 'inference', 'trainers'))\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import registry.packs loads {out.stdout.strip()}"


def test_package_faces_name_what_exists_and_import_lazily():
    code = ("import importlib, sys\n"
            "for p in ('registry', 'lora_experts', 'distill', 'inference', 'trainers'):\n"
            "    m = importlib.import_module(p)\n"
            "    assert m.__all__, p\n"
            "    assert not set(m.__all__) & {s.name for s in __import__('pkgutil').iter_modules(m.__path__)}, p\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('peft', 'lightning', 'inference', 'trainers')"
            " and m not in ('inference', 'trainers'))\n"
            "print(','.join(heavy))\n"
            "for p in ('registry', 'lora_experts', 'distill', 'inference', 'trainers'):\n"
            "    m = importlib.import_module(p)\n"
            "    for name in m.__all__:\n"
            "        assert getattr(m, name) is getattr(importlib.import_module(m._EXPORTS[name]), name), name\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"importing the package faces loaded {out.stdout.strip()}"
    import inference

    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        inference.nothing_here  # noqa: B018


def test_results_page_is_generated_from_the_benchmarks_tables():
    out = subprocess.run([sys.executable, "benchmarks/results_page.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr


def bare_continuations(source: str) -> list[int]:
    """Line numbers, in ``source``, of lines ending in one backslash inside a module-level text: the module
    docstring or a string assigned at module level (a command's ``DESCRIPTION``). Python joins such a line with
    the next (the backslash vanishes), so a multi-line command printed by ``--help`` would run together. Raw
    strings keep it and are fine; so does the backslash right after an opening triple quote (it only drops the
    first newline)."""
    tree = ast.parse(source)
    values = [node.value for i, node in enumerate(tree.body)
              if (isinstance(node, ast.Expr) and i == 0) or isinstance(node, ast.Assign)]
    found = []
    for value in values:
        if not (isinstance(value, ast.Constant) and isinstance(value.value, str)):
            continue
        text = ast.get_source_segment(source, value)
        if text.lower().startswith(("r", "br", "rb")):
            continue
        found += [value.lineno + i for i, line in enumerate(text.splitlines())
                  if line.endswith("\\") and (len(line) - len(line.rstrip("\\"))) % 2 == 1
                  and not (i == 0 and line in ('"""\\', "'''\\"))]
    return found


def test_docstring_commands_keep_their_line_continuations():
    scripts = [*sorted((ROOT / "benchmarks").glob("*.py")), *sorted((ROOT / "examples").glob("*.py"))]
    scripts += [path for package in ORDER for path in sorted((ROOT / package).rglob("*.py"))]
    wrong = [f"{path.relative_to(ROOT)}:{n}" for path in scripts for n in bare_continuations(path.read_text())]
    assert not wrong, f"write '\\\\' to show a line continuation in a docstring: {wrong}"


def test_bare_continuations_are_found():
    assert bare_continuations('"""Run:\n\n    cmd --a \\\n        --b\n"""\n') == [3]
    assert bare_continuations('"""Run:\n\n    cmd --a \\\\\n        --b\n"""\n') == []
    assert bare_continuations('r"""Run:\n\n    cmd --a \\\n        --b\n"""\n') == []
    # A command's help text assigned at module level counts too; its opening backslash does not.
    assert bare_continuations('X = 1\nHELP = """\\\nRun:\n    cmd --a \\\n        --b\n"""\n') == [4]
    assert bare_continuations('X = 1\nHELP = """\\\nRun:\n    cmd --a \\\\\n        --b\n"""\n') == []


def test_recorded_commands_paste_back_into_a_shell():
    """A benchmark's recorded command splits back into the arguments it ran with: an empty value, a pattern and
    a quote survive (joined with bare spaces, ``--untouched ''`` lost its value and took the next flag's)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.command import recorded

    argv = ["--untouched", "", "--teachers", "runs/{lang}-t.safetensors", "--name", "it's", "--table-only"]
    line = recorded("distill_wer.py", argv, drop=("--table-only",))
    assert line.startswith("python benchmarks/distill_wer.py --untouched '' --teachers ")
    assert shlex.split(line)[2:] == argv[:-1]


def test_recorded_options_read_back_as_argparse_read_them():
    """A results file's recorded command gives back the value of a flag (the last one given) or the default."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.command import recorded, recorded_option

    line = recorded("real_fusion.py", ["--search", "fixed", "--name", "it's", "--search", "grid"])
    assert recorded_option(line, "--search") == "grid" and recorded_option(line, "--name") == "it's"
    assert recorded_option(line, "--target-seed", "0") == "0"
    assert recorded("merge_speed.py", ["--repeats", "3"]) == "python benchmarks/merge_speed.py --repeats 3"


def test_benchmarks_record_their_command_quoted():
    joined = [path.name for path in sorted((ROOT / "benchmarks").glob("*.py"))
              if path.name != "command.py" and "sys.argv[1:]" in path.read_text()]
    assert not joined, f"record the command with benchmarks.command.recorded (quoted), not by joining argv: {joined}"
