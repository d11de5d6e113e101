"""Kubernetes manifests render offline and validate against the API schemas; the pieces SREs rely on exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pdserve.deploy.validate import apply_json6902, build, trees, validate


@pytest.mark.parametrize("tree", trees(), ids=lambda p: p.name)
def test_tree_renders_and_validates(tree):
    docs = build(tree)
    assert validate(docs) == []
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for role in ("router", "prefill", "decode"):
        assert ("Deployment", f"pdserve-{role}") in kinds
        assert ("PodDisruptionBudget", f"pdserve-{role}") in kinds
    for pool in ("prefill", "decode"):
        assert ("HorizontalPodAutoscaler", f"pdserve-{pool}") in kinds
        svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == f"pdserve-{pool}")
        assert svc["spec"]["clusterIP"] == "None", "workers are discovered through a headless Service"
        dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == f"pdserve-{pool}")
        spec = dep["spec"]["template"]["spec"]
        c = spec["containers"][0]
        assert "grpc" in c["readinessProbe"] and "grpc" in c["livenessProbe"]
        assert c["lifecycle"]["preStop"] and spec["terminationGracePeriodSeconds"] >= 60
        assert ":" in c["image"] and "--advertise-host" in c["args"]


def test_gpu_overlay_asks_for_gpus():
    gpu = next(t for t in trees() if t.name == "gpu")
    for d in build(gpu):
        if d["kind"] == "Deployment" and d["metadata"]["name"] in ("pdserve-prefill", "pdserve-decode"):
            c = d["spec"]["template"]["spec"]["containers"][0]
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and "cuda" in c["args"]


def test_a_broken_manifest_fails_validation():
    docs = build(trees()[0])
    dep = next(d for d in docs if d["kind"] == "Deployment")
    apply_json6902(dep, [{"op": "replace", "path": "/spec/replicas", "value": "two"}])
    assert validate(docs), "a string replica count must be refused"
    with pytest.raises(ValueError, match="missing path"):
        apply_json6902(dep, [{"op": "replace", "path": "/spec/nope", "value": 1}])


DOCKER = Path(__file__).resolve().parents[2] / "deploy" / "docker"


def documented_images() -> set[str]:
    """The image references the Dockerfiles' build lines tag (``docker build ... -t REF .``)."""
    refs = set()
    for f in DOCKER.glob("Dockerfile.*"):
        refs.update(re.findall(r"docker build .*?-t (\S+) \.", f.read_text().splitlines()[0]))
    return refs


def image_cache_dir() -> str:
    (path,) = {m for f in DOCKER.glob("Dockerfile.*") for m in re.findall(r"PDSERVE_CACHE_DIR=(\S+)", f.read_text())}
    return path


def pod_specs(docs):
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in docs if d["kind"] == "Deployment"]


@pytest.mark.parametrize("tree", trees(), ids=lambda p: p.name)
def test_every_image_is_one_the_dockerfiles_build(tree):
    assert len(documented_images()) == 2, documented_images()
    for name, spec in pod_specs(build(tree)):
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            assert c["image"] in documented_images(), (tree.name, name, c["image"])


@pytest.mark.parametrize("tree", trees(), ids=lambda p: p.name)
def test_the_router_gets_a_prestop_within_its_grace(tree):
    (spec,) = [spec for name, spec in pod_specs(build(tree)) if name == "pdserve-router"]
    command = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and 0 < int(command[1]) < spec["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("tree", trees(), ids=lambda p: p.name)
def test_a_volume_over_the_image_cache_is_seeded_from_it(tree):
    """A volume mounted at the image's PDSERVE_CACHE_DIR would hide the presets baked there: an init container
    must copy them into that volume first (mounting it elsewhere, so it still sees the image's directory)."""
    cache = image_cache_dir()
    seeded = 0
    for name, spec in pod_specs(build(tree)):
        for c in spec["containers"]:
            over = [m["name"] for m in c.get("volumeMounts", []) if m["mountPath"].rstrip("/") == cache]
            for volume in over:
                seeders = [i for i in spec.get("initContainers", [])
                           if any(m["name"] == volume and m["mountPath"] != cache for m in i.get("volumeMounts", []))
                           and f"cp -R {cache}/." in " ".join(i.get("command", []))]
                assert seeders, f"{name}: volume {volume!r} hides the presets baked into {cache}"
                seeded += 1
    assert seeded >= 2, "prefill and decode keep a writable cache volume"


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


@pytest.mark.parametrize("tree", trees(), ids=lambda p: p.name)
def test_the_router_tokenizes_with_the_model_its_workers_serve(tree):
    """A router left on its default model while the workers run another would tokenize with the wrong
    vocabulary: every tree names one model for all three."""
    models = {name: _flag(spec["containers"][0]["args"], "--model") for name, spec in pod_specs(build(tree))}
    assert set(models) == {"pdserve-router", "pdserve-prefill", "pdserve-decode"}
    assert len(set(models.values())) == 1 and None not in models.values(), models
