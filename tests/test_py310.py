"""pyproject promises Python >= 3.10: no source file may need 3.11+ syntax or an unguarded 3.11+ module."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Standard-library names that appeared in 3.11 or later (module -> attributes; None = the module itself).
NEW_MODULES = {"tomllib", "wsgiref.types"}
NEW_ATTRIBUTES = {
    "typing": {"Self", "LiteralString", "Never", "assert_never", "assert_type", "reveal_type", "Required",
               "NotRequired", "TypeVarTuple", "Unpack", "dataclass_transform", "override"},
    "datetime": {"UTC"},
    "enum": {"StrEnum", "verify", "ReprEnum"},
    "contextlib": {"chdir"},
    "asyncio": {"TaskGroup", "timeout", "Runner"},
    "hashlib": {"file_digest"},
    "itertools": {"batched"},
    "operator": {"call"},
}
NEW_BUILTINS = {"ExceptionGroup", "BaseExceptionGroup"}


def _sources():
    for top in ("cli.py", "distill", "students", "teachers", "benchmarks", "scripts", "tests"):
        path = REPO / top
        yield from ([path] if path.is_file() else sorted(path.rglob("*.py")))


def _guarded(tree: ast.AST) -> set[int]:
    """Line numbers of imports inside `try:` blocks that catch ImportError/ModuleNotFoundError."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            lines.update(n.lineno for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return lines


def test_sources_parse_as_python_310_and_use_no_311_stdlib():
    problems = []
    for path in _sources():
        rel = path.relative_to(REPO)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(rel), feature_version=(3, 10))
        except SyntaxError as err:
            problems.append(f"{rel}:{err.lineno}: not Python 3.10 syntax ({err.msg})")
            continue
        guarded = _guarded(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [(node.module, a.name) for a in node.names]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.attr in NEW_ATTRIBUTES.get(node.value.id, ()):
                    problems.append(f"{rel}:{node.lineno}: {node.value.id}.{node.attr} is Python 3.11+")
                continue
            elif isinstance(node, ast.Name) and node.id in NEW_BUILTINS:
                problems.append(f"{rel}:{node.lineno}: {node.id} is Python 3.11+")
                continue
            else:
                continue
            for module, attr in names:
                new = module in NEW_MODULES or attr in NEW_ATTRIBUTES.get(module, ())
                if new and node.lineno not in guarded:
                    problems.append(f"{rel}:{node.lineno}: {module}{'.' + attr if attr else ''} is Python 3.11+")
    assert not problems, "\n".join(problems)


def test_config_loads_where_tomllib_is_missing(tmp_path):
    """Python 3.10 has no tomllib; the `tomli` package (the same parser, a 3.10 dependency) stands in."""
    config = tmp_path / "run.toml"
    config.write_text('[train]\nsteps = 7\n')
    script = (
        "import sys, tomllib\n"
        "sys.modules['tomli'] = tomllib\n"   # tomli's API is tomllib's: tomllib is tomli, vendored in 3.11
        "sys.modules['tomllib'] = None\n"    # `import tomllib` now raises ModuleNotFoundError, as on 3.10
        "from distill.pipeline.config import load_config\n"
        f"print(load_config({str(config)!r}).train.steps)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "7"
