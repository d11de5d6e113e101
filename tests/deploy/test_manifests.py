"""Kubernetes manifests render offline and validate against the API schemas; the pieces SREs rely on exist."""

from __future__ import annotations

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
