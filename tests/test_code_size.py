"""House rule: no handwritten module over 400 lines and no class over 200 (compose small managers instead).

Every Python file git tracks is checked, except the generated gRPC stubs (``protos/*_pb2*.py``). Outside a
git checkout the repository's folders are walked instead.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 200
SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "node_modules", "__pycache__"}


def generated(rel: str) -> bool:
    path = Path(rel)
    return path.parts[:1] == ("protos",) and "_pb2" in path.name


def handwritten_modules() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", "*.py"], cwd=ROOT, capture_output=True,
                             check=True, timeout=60).stdout.decode()
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.SubprocessError):
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                 if not SKIP_DIRS.intersection(p.relative_to(ROOT).parts[:-1])
                 and not any(part.endswith(".egg-info") for part in p.parts)]
    return sorted(f for f in files if not generated(f) and (ROOT / f).is_file())


def test_the_walk_finds_the_packages_and_skips_generated_stubs():
    files = handwritten_modules()
    assert "engine/engine.py" in files and "kvtransfer/receiver.py" in files and "tests/test_boundaries.py" in files
    assert not [f for f in files if generated(f)]


def test_no_module_over_400_lines():
    too_long = []
    for rel in handwritten_modules():
        num_lines = len((ROOT / rel).read_text(encoding="utf-8").splitlines())
        if num_lines > MAX_MODULE_LINES:
            too_long.append(f"{rel}: {num_lines} lines")
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines (split them by responsibility): {too_long}"


def test_no_class_over_200_lines():
    too_long = []
    for rel in handwritten_modules():
        tree = ast.parse((ROOT / rel).read_text(encoding="utf-8"), filename=rel)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                num_lines = node.end_lineno - first + 1
                if num_lines > MAX_CLASS_LINES:
                    too_long.append(f"{rel}:{node.lineno} class {node.name}: {num_lines} lines")
    assert not too_long, f"classes over {MAX_CLASS_LINES} lines (compose small managers): {too_long}"
