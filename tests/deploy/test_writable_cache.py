"""Every pod can write its cache dir: the images run as a non-root user (USER 65534) and bake
PDSERVE_CACHE_DIR as root, so the directory in the image is read-only to the process.

The router writes there too (batch.sqlite3, the batch jobs' store; tokenizers of presets it builds, e.g.
llama-1b-dummy): without a volume over it the router pod exits at start (PermissionError opening SQLite).
"""

from __future__ import annotations

import re

import pytest

from pdserve.deploy.validate import build, trees
from tests.deploy.test_manifests import DOCKER, image_cache_dir


def test_the_images_run_as_non_root():
    for dockerfile in DOCKER.glob("Dockerfile.*"):
        users = re.findall(r"^USER\s+(\S+)", dockerfile.read_text(), re.M)
        assert users and users[-1] not in ("root", "0"), dockerfile.name


@pytest.mark.parametrize("tree", trees(), ids=lambda p: p.name)
def test_every_container_has_a_writable_cache_dir(tree):
    for d in build(tree):
        if d["kind"] != "Deployment":
            continue
        spec = d["spec"]["template"]["spec"]
        for c in spec["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            cache = env.get("PDSERVE_CACHE_DIR") or image_cache_dir()
            mounts = {m["mountPath"].rstrip("/"): m for m in c.get("volumeMounts", [])}
            assert cache in mounts, f"{tree.name} {d['metadata']['name']}: nothing writable at {cache}"
            assert not mounts[cache].get("readOnly"), f"{tree.name} {d['metadata']['name']}: {cache} is read-only"
