"""The layers, checked from the source (ast, so strings and comments do not count):

  cli.py -> stage packages teachers/, students/ -> core distill/ (models, cache, losses, data, options, ...)
  orchestration distill/pipeline/ and distill/bench/ may use the stage packages.

(a) the core imports neither teachers/ nor students/ (outside distill/pipeline and distill/bench);
(b) only distill/models/ loads a model or tokenizer: no `from_pretrained(` call elsewhere, no import of
    transformers' Auto* classes or peft's PeftModel elsewhere;
(c) the benchmark loads, samples and reads heads through distill.models: it imports nothing from
    students/ and from teachers/ only the answer checker (teachers.verify) and the teacher backends
    (teachers.backends: the teacher as a verifier goes through the same seam as the cache build);
(d) the teacher runners (cache build, trace generation) reach the model only through a backend
    (teachers/backends): they load nothing and use no head themselves.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORCHESTRATION = ("distill/pipeline/", "distill/bench/")
LOADER_NAMES = ("PeftModel",)
RUNNERS = ("teachers/cache_build.py", "teachers/generate.py")
BENCH_ALLOWED = ("teachers.verify", "teachers.backends")
MODEL_ACCESS = ("load_model", "load_tokenizer", "model_hidden_and_head", "verify_head", "generate_rows",
                "sample_completions")


def _sources(root: Path):
    files = sorted(p for d in ("distill", "teachers", "students") for p in (root / d).rglob("*.py"))
    files.append(root / "cli.py")
    for path in files:
        yield path.relative_to(root).as_posix(), ast.parse(path.read_text(), filename=str(path))


def _imports(tree):
    """(line, module, imported names) of every import statement, wherever it is (lazy ones included)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module, [a.name for a in node.names]


def _top(module: str) -> str:
    return module.split(".")[0]


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for rel, tree in _sources(root):
        in_core = rel.startswith("distill/") and not rel.startswith(ORCHESTRATION)
        in_models = rel.startswith("distill/models/")
        for line, module, names in _imports(tree):
            if in_core and _top(module) in ("teachers", "students"):
                found.append(f"{rel}:{line}: the core imports {module}")
            if rel.startswith("distill/bench/"):
                if _top(module) == "students" or (_top(module) == "teachers" and module not in BENCH_ALLOWED):
                    found.append(f"{rel}:{line}: the benchmark imports {module}; use distill.models")
            if rel in RUNNERS and module.startswith("distill.models"):
                direct = [n for n in names if n in MODEL_ACCESS] or (["head"] if module == "distill.models.head" else [])
                if direct:
                    found.append(f"{rel}:{line}: the runner uses {', '.join(direct)}; go through teachers.backends")
            if not in_models:
                loaders = [n for n in names if n.startswith("Auto") or n in LOADER_NAMES]
                if _top(module) in ("transformers", "peft") and loaders:
                    found.append(f"{rel}:{line}: imports {', '.join(loaders)} outside distill/models")
        if not in_models:
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    func = node.func
                    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                    if name == "from_pretrained":
                        found.append(f"{rel}:{node.lineno}: from_pretrained(...) outside distill/models")
    return found


def test_layers_are_respected():
    assert violations() == []


def test_the_check_sees_what_it_forbids(tmp_path):
    """The checker itself: each rule fires on a file that breaks it (and a string does not count)."""
    for d in ("distill/bench", "distill/cache", "teachers", "students"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "cli.py").write_text("import typer\n")
    (tmp_path / "distill/cache/x.py").write_text("def f():\n    from students.train import train\n")
    (tmp_path / "distill/bench/y.py").write_text("from teachers.generate import format_prompt\nimport teachers.verify\n")
    (tmp_path / "teachers/z.py").write_text(
        "from transformers import AutoTokenizer\nfrom peft import PeftModel\n"
        "m = Model.from_pretrained('x')\ns = 'AutoModelForCausalLM.from_pretrained(path)'\n")
    (tmp_path / "students/ok.py").write_text("from peft import get_peft_model\n")
    (tmp_path / "teachers/generate.py").write_text("from distill.models.sampling import generate_rows, row_seed\n")
    found = violations(tmp_path)
    assert any("distill/cache/x.py:2: the core imports students.train" in v for v in found)
    assert any("distill/bench/y.py:1: the benchmark imports teachers.generate" in v for v in found)
    assert not any("teachers.verify" in v for v in found)
    assert any("teachers/z.py:1: imports AutoTokenizer" in v for v in found)
    assert any("teachers/z.py:2: imports PeftModel" in v for v in found)
    assert any("teachers/z.py:3: from_pretrained" in v for v in found)
    assert any("teachers/generate.py:1: the runner uses generate_rows" in v for v in found)
    assert len(found) == 6, found
