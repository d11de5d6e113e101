"""Many models, one cluster: the CLI flags for named base models, LoRA adapters and traffic splits.

Workers: ``--served-model-name`` (default: the preset's name, a directory's last component), ``--lora NAME=PATH``
(repeatable, loaded at start; implies ``--enable-lora``), ``--max-loras``, ``--max-lora-rank``.
Router: ``--model [NAME=]PATH`` (repeatable: one base model each, the first the default; a bare PATH is named
like a worker names it) and ``--route NAME=MODEL:WEIGHT,...`` (repeatable).
``pdserve up``: ``--model [NAME=]PATH[:PREFILL:DECODE]`` (repeatable, pool sizes per model; default: --prefill and
--decode), ``--lora``/``--max-loras`` (every worker of the first model's pool, or ``--lora BASE/NAME=PATH``; BASE
must be a --model name, so an adapter started by ``up`` has no "/" in its name), ``--route``.
Model paths and adapter directories are checked before any process starts (exit 2 naming the flag).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pdserve.deploy import cli_checks as checks
from pdserve.deploy.cli_checks import UsageError
from pdserve.engine.models import DEFAULT_MODEL


def _usage(flag: str, fn, *args):
    try:
        return fn(*args)
    except ValueError as e:
        raise UsageError(f"{flag}: {str(e).split(': ', 1)[-1]}") from None


# ---- workers ----------------------------------------------------------------------------------------
def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--served-model-name", default="", metavar="NAME",
                   help="the base model's name in the cluster (default: the preset's name or the directory's last part)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="load this PEFT LoRA adapter at start (repeatable; implies --enable-lora)")
    p.add_argument("--enable-lora", action="store_true", help="accept LoRA adapters (Admin.LoadAdapter at run time)")
    p.add_argument("--max-loras", type=checks.positive_int, default=4, help="adapters resident at once (LRU)")
    p.add_argument("--max-lora-rank", type=checks.positive_int, default=64, help="largest adapter rank accepted")


def engine_kwargs(a: argparse.Namespace) -> dict:
    """EngineConfig's LoRA fields (none without LoRA: the engine's defaults)."""
    from pdserve.serving.model_names import parse_named_list

    loras = _usage("--lora", parse_named_list, a.lora, "--lora")
    for _, path in loras:
        checks.check_adapter_dir(path)
    if not (a.enable_lora or loras):
        return {}
    return {"enable_lora": True, "max_loras": a.max_loras, "max_lora_rank": a.max_lora_rank, "lora_modules": loras}


def served_model(a: argparse.Namespace) -> str:
    from pdserve.serving.model_names import check_name, served_name

    return _usage("--served-model-name", check_name, a.served_model_name or served_name(a.model), "name")


# ---- router -----------------------------------------------------------------------------------------
def add_router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", default=[], metavar="[NAME=]PATH",
                   help=f"a base model whose requests this router serves, with its tokenizer (repeatable; the first "
                        f"is the default; default: {DEFAULT_MODEL})")
    p.add_argument("--route", action="append", default=[], metavar="NAME=MODEL:WEIGHT,...",
                   help="traffic split: requests for NAME go to the models by weight, sticky per session_id "
                        "(repeatable), e.g. chat=base:90,base-lora-v2:10")
    add_generation_config_arg(p)


def add_generation_config_arg(p) -> None:
    p.add_argument("--generation-config", choices=["auto", "none"], default="auto",
                   help="auto: sampling fields a request leaves unset (temperature, top_p, top_k, repetition_penalty, "
                        "min_p, max_tokens) take the model's generation_config.json values, as vLLM's server does; "
                        "none: the API's defaults")


def router_kwargs(a: argparse.Namespace) -> dict:
    """RouterConfig's model, models and routes; every check before anything starts."""
    from pdserve.router.routes import parse_routes
    from pdserve.serving.model_names import parse_named_list

    values = a.model or [DEFAULT_MODEL]
    models = _usage("--model", parse_named_list, values, "--model")
    for _, path in models:
        checks.check_model(path)
    _usage("--route", parse_routes, a.route)
    if len(values) == 1 and "=" not in values[0]:  # one model named as given: the single-model router of old
        return {"model": values[0], "routes": tuple(a.route), "generation_config": a.generation_config}
    return {"model": models[0][1], "models": models, "routes": tuple(a.route), "generation_config": a.generation_config}


# ---- pdserve up ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ModelPool:
    name: str
    path: str
    num_prefill: int
    num_decode: int
    loras: tuple[tuple[str, str], ...] = ()  # (name, path) loaded at start on every worker of this pool


def add_up_args(e: argparse.ArgumentGroup) -> None:
    e.add_argument("--model", action="append", default=[], metavar="[NAME=]PATH[:PREFILL:DECODE]",
                   help=f"a base model and its pool sizes (repeatable: one pool pair per model, the first the default; "
                        f"sizes default to --prefill/--decode; default: {DEFAULT_MODEL})")
    e.add_argument("--lora", action="append", default=[], metavar="[BASE/]NAME=PATH",
                   help="a LoRA adapter every worker of BASE's pool (default: the first model's) loads at start")
    e.add_argument("--enable-lora", action="store_true", help="every worker accepts adapters (Admin.LoadAdapter)")
    e.add_argument("--max-loras", type=checks.positive_int, default=4, help="adapters resident per worker (LRU)")
    e.add_argument("--route", action="append", default=[], metavar="NAME=MODEL:WEIGHT,...",
                   help="traffic split (repeatable), e.g. chat=base:90,base-lora-v2:10")
    add_generation_config_arg(e)


def _pool(value: str, num_prefill: int, num_decode: int) -> ModelPool:
    from pdserve.serving.model_names import parse_named

    spec, sizes = value, (num_prefill, num_decode)
    head, sep, d = value.rpartition(":")
    if sep and d.isdigit():
        rest, sep2, p = head.rpartition(":")
        if not (sep2 and p.isdigit()):
            raise UsageError(f"--model: expected [NAME=]PATH[:PREFILL:DECODE], got {value!r}")
        spec, sizes = rest, (int(p), int(d))
    if sizes[1] < 1:
        raise UsageError(f"--model: {value!r}: a model needs at least one decode worker")
    name, path = _usage("--model", parse_named, spec, "--model")
    checks.check_model(path)
    return ModelPool(name, path, *sizes)


def up_pools(a: argparse.Namespace) -> list[ModelPool]:
    """``pdserve up``'s pools; UsageError on bad flags."""
    from pdserve.router.routes import parse_routes
    from pdserve.serving.model_names import parse_named

    pools = [_pool(v, a.prefill, a.decode) for v in a.model or [DEFAULT_MODEL]]
    names = [p.name for p in pools]
    if len(set(names)) != len(names):
        raise UsageError(f"--model: two models share a name ({', '.join(names)}); name them NAME=PATH")
    loras: dict[str, list[tuple[str, str]]] = {}
    for value in a.lora:
        spec, _, path = value.partition("=")
        base, _, name = spec.rpartition("/")
        if base and base not in names:  # a mistyped base must not become an adapter named "base/name"
            raise UsageError(f"--lora: {base!r} in {spec!r} is not a --model name (models: {', '.join(names)})")
        name, path = _usage("--lora", parse_named, f"{name}={path}", "--lora")
        checks.check_adapter_dir(path)
        loras.setdefault(base or names[0], []).append((name, path))
    routes = {r.name for r in _usage("--route", parse_routes, a.route)}
    _check_unique_names(names, [n for pool in loras.values() for n, _ in pool], routes)
    return [ModelPool(p.name, p.path, p.num_prefill, p.num_decode, tuple(loras.get(p.name, ()))) for p in pools]


def _check_unique_names(models: list[str], adapters: list[str], routes: set[str]) -> None:
    """One name, one thing: a request's ``model`` must not be able to mean two of them (the router would list
    both and serve only one)."""
    for r in sorted(routes & set(models)):
        raise UsageError(f"--route: {r!r} is also a --model name")
    seen: set[str] = set()
    for name in adapters:
        if name in models or name in routes:
            raise UsageError(f"--lora: {name!r} is already a {'--model' if name in models else '--route'} name")
        if name in seen:
            raise UsageError(f"--lora: {name!r} is given twice")
        seen.add(name)


def pool_worker_args(pool: ModelPool, max_loras: int, enable_lora: bool = False) -> list[str]:
    args = ["--model", pool.path, "--served-model-name", pool.name]
    for name, path in pool.loras:
        args += ["--lora", f"{name}={path}"]
    if enable_lora:
        args.append("--enable-lora")
    if pool.loras or enable_lora:
        args += ["--max-loras", str(max_loras)]
    return args


def router_model_args(pools: list[ModelPool], routes: list[str]) -> list[str]:
    args = []
    for p in pools:
        args += ["--model", f"{p.name}={p.path}"]
    for r in routes:
        args += ["--route", r]
    return args
