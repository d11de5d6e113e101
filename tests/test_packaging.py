"""A normal (non-editable) install puts exactly one top-level import package, ``pdserve``, in site-packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_one_top_level_package(tmp_path):
    wheels = tmp_path / "wheels"
    # build from a clean copy: setuptools reuses an in-tree build/ folder, whose stale files would hide
    # (or add) modules that the source tree no longer has
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                              ".whl", ".devcarry", ".devprobe", "bench/out"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("pdserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith((".dist-info", ".data"))}
    assert top == {"pdserve"}, sorted(top)
    # the pieces a user and the workers need are inside it
    for path in ("pdserve/__init__.py", "pdserve/__main__.py", "pdserve/cli.py", "pdserve/engine/__init__.py",
                 "pdserve/engine/lora/slots.py",
                 "pdserve/protos/pdserve.proto", "pdserve/protos/pdserve_pb2_grpc.py", "pdserve/router/server.py",
                 "pdserve/kvtransfer/__init__.py", "pdserve/serving/errors.py", "pdserve/deploy/local.py",
                 *(f"pdserve/engine/presets/tiny-chat/{f}" for f in ("config.json", "model.safetensors",
                   "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"))):
        assert path in names, path
    # no tests and no stray repository files
    assert not [n for n in names if n.startswith(("pdserve/tests/", "pdserve/.venv", "pdserve/.git"))]
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "pdserve = pdserve.cli:main" in entry

    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    packages = sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin")
    assert packages == ["pdserve"]
    # the installed copy imports on its own (stubs import pdserve.protos, not a top-level protos)
    probe = subprocess.run(
        [sys.executable, "-I", "-c",
         f"import sys; sys.path.insert(0, {str(target)!r}); import pdserve.protos.pdserve_pb2_grpc as g, pdserve; "
         "print(pdserve.__file__)"],
        capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.strip().startswith(str(target))
