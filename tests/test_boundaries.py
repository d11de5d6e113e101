"""Package boundaries: dependencies point inward, and the light leaves stay light.

Static rules are checked on every module's imports (AST, including imports inside functions); the
torch-free rule is checked for real in a fresh interpreter, since it holds for the whole import closure.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "kvtransfer", "prefill", "decode", "router", "serving", "protos", "deploy", "bench")

# bench scripts that run an in-process baseline (engine, kernels, transfer layer, fake workers) may reach
# inside; every other bench module uses only the public API
BENCH_BASELINES = {"engine_bench", "engine_ops", "gpu_check", "gpu_serving", "transfer_bench", "serving_bench",
                   "kv_port_flood", "semantic_cache_bench",  # times the embedder in-process
                   "sampler_bench", "penalty_bench", "structured_bench",  # time the engine's sampler in-process
                   "noop_workers"}
PUBLIC_API = ("pdserve.protos", "pdserve.bench", "pdserve.deploy.local", "pdserve.serving.rpc")


def imports_of(path: Path) -> set[str]:
    """Every pdserve / third-party module a file imports, as dotted names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            if node.module == "pdserve":
                out.update(f"pdserve.{a.name}" for a in node.names)
    return out


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in modules(package):
        for name in imports_of(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


def test_engine_imports_no_service_proto_or_router():
    forbidden = ("pdserve.prefill", "pdserve.decode", "pdserve.router", "pdserve.serving", "pdserve.protos",
                 "pdserve.kvtransfer", "pdserve.deploy", "pdserve.cli", "pdserve.bench", "grpc")
    assert _violations("engine", forbidden) == []


def test_kvtransfer_imports_no_role_and_no_router():
    forbidden = ("pdserve.prefill", "pdserve.decode", "pdserve.router", "pdserve.deploy", "pdserve.cli",
                 "pdserve.serving", "pdserve.protos", "grpc")
    assert _violations("kvtransfer", forbidden) == []


def test_router_never_imports_kvtransfer_or_torch():
    forbidden = ("pdserve.kvtransfer", "pdserve.prefill", "pdserve.decode", "torch", "transformers",
                 "pdserve.engine.engine", "pdserve.engine.engine_loop", "pdserve.engine.model_runner",
                 "pdserve.engine.kv_cache", "pdserve.engine.llm")
    assert _violations("router", forbidden) == []


def test_serving_and_protos_import_no_role():
    forbidden = ("pdserve.prefill", "pdserve.decode", "pdserve.router", "pdserve.kvtransfer", "pdserve.cli",
                 "pdserve.deploy")
    assert _violations("serving", forbidden) == []
    assert _violations("protos", forbidden + ("pdserve.serving", "pdserve.engine")) == []


def test_roles_do_not_import_each_other_or_the_router():
    assert _violations("prefill", ("pdserve.decode", "pdserve.router", "pdserve.cli")) == []
    assert _violations("decode", ("pdserve.prefill", "pdserve.router", "pdserve.cli")) == []


def test_bench_uses_only_the_public_api():
    bad = []
    for path in modules("bench"):
        if path.stem in BENCH_BASELINES:
            continue
        for name in imports_of(path):
            if not name.startswith("pdserve.") or name in ("pdserve.LLM", "pdserve.SamplingParams"):
                continue
            if not any(name == p or name.startswith(p + ".") for p in PUBLIC_API):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert bad == []


def test_gateway_talks_to_the_router_only_over_its_public_api():
    allowed = ("pdserve.protos", "pdserve.serving.rpc", "pdserve.serving.observability", "pdserve.serving.tracing",
               "pdserve.router.gateway")
    bad = [f"{path.relative_to(ROOT)} imports {name}" for path in modules("router/gateway")
           for name in imports_of(path)
           if name.startswith("pdserve") and not any(name == a or name.startswith(a + ".") for a in allowed)]
    assert bad == []


def test_the_rules_can_fail(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from pdserve.router.policy import PairPolicy\nimport torch\n")
    assert imports_of(f) == {"pdserve.router.policy", "torch"}


LIGHT = [
    "pdserve",
    "pdserve.router.server",
    "pdserve.router.service",
    "pdserve.router.gateway.app",
    "pdserve.router.gateway.server",
    "pdserve.deploy.cli_gateway",
    "pdserve.protos.pdserve_pb2_grpc",
    "pdserve.cli",
    "pdserve.engine",
    "pdserve.engine.hashing",
    "pdserve.engine.priority",
    "pdserve.engine.sampling_params",
    "pdserve.engine.errors",
    "pdserve.engine.layout",
    "pdserve.engine.tokenizer",
    "pdserve.engine.models",
    "pdserve.engine.structured_outputs",
    "pdserve.serving.errors",
    "pdserve.serving.convert",
]


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_never_load_torch(module):
    code = (
        f"import sys, importlib; importlib.import_module({module!r}); "
        "heavy = sorted(m for m in ('torch', 'transformers', 'pdserve.kvtransfer') if m in sys.modules); "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"{module} loads {out.stdout.strip()}"


def test_offline_api_is_importable_from_the_root():
    code = "from pdserve import LLM, SamplingParams; print(LLM.__module__, SamplingParams.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["pdserve.engine.llm", "pdserve.engine.sampling_params"]
