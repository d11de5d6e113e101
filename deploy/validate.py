"""Render the kustomize tree offline and validate every object against the Kubernetes schemas.

    python -m deploy.validate [deploy/k8s/overlays/gpu ...]     # default: base and every overlay

The renderer supports the kustomize features these manifests use (``resources``, ``labels``, ``images``,
JSON 6902 ``patches`` with a target), so CI can check manifests with no kustomize binary and no network;
schemas come from the kubernetes-validate package. ``kustomize build`` renders the same trees.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent / "k8s"
K8S_VERSION = "1.33.0"


def _pointer(doc, path: str):
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    parent = doc
    for p in parts[:-1]:
        parent = parent[int(p)] if isinstance(parent, list) else parent.setdefault(p, {})
    return parent, parts[-1]


def apply_json6902(doc: dict, ops: list[dict]) -> None:
    for op in ops:
        parent, key = _pointer(doc, op["path"])
        kind = op["op"]
        if isinstance(parent, list):
            if kind == "add":
                parent.insert(len(parent) if key == "-" else int(key), copy.deepcopy(op["value"]))
            elif kind == "replace":
                parent[int(key)] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[int(key)]
        else:
            if kind in ("add", "replace"):
                if kind == "replace" and key not in parent:
                    raise ValueError(f"patch: replace of missing path {op['path']}")
                parent[key] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[key]
            else:
                raise ValueError(f"patch: unsupported op {kind!r}")


def _images(doc: dict, images: list[dict]) -> None:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:  # as kustomize does
        name, _, tag = c["image"].partition(":")
        for img in images:
            if img["name"] == name:
                name = img.get("newName", name)
                tag = img.get("newTag", tag)
        c["image"] = f"{name}:{tag}" if tag else name


def _labels(doc: dict, labels: list[dict]) -> None:
    for entry in labels:
        doc.setdefault("metadata", {}).setdefault("labels", {}).update(entry.get("pairs", {}))


def build(directory: Path) -> list[dict]:
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for res in kust.get("resources", []):
        path = (directory / res).resolve()
        if path.is_dir():
            docs += build(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for doc in docs:
        _images(doc, kust.get("images", []))
        _labels(doc, kust.get("labels", []))
    for patch in kust.get("patches", []):
        target = patch["target"]
        ops = yaml.safe_load(patch["patch"])
        hits = [d for d in docs if d["kind"] == target.get("kind") and d["metadata"]["name"] == target.get("name")]
        if not hits:
            raise ValueError(f"{directory}: patch target {target} matches nothing")
        for d in hits:
            apply_json6902(d, ops)
    return docs


def validate(docs: list[dict]) -> list[str]:
    import kubernetes_validate

    errors = []
    for d in docs:
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{d['kind']}/{d['metadata']['name']}: {e.message} at {list(e.path)}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{d['kind']}/{d['metadata']['name']}: no schema ({e})")
    return errors


def trees() -> list[Path]:
    return [ROOT / "base", *sorted(p for p in (ROOT / "overlays").iterdir() if p.is_dir())]


def main(argv: list[str]) -> int:
    dirs = [Path(a) for a in argv] or trees()
    failed = False
    for d in dirs:
        docs = build(d)
        errors = validate(docs)
        print(f"{d}: {len(docs)} objects, {'OK' if not errors else f'{len(errors)} errors'}")
        for e in errors:
            print("  " + e)
        failed |= bool(errors)
    extra = ROOT / "prometheus-adapter-rules.yaml"
    errors = validate([d for d in yaml.safe_load_all(extra.read_text()) if d])
    failed |= bool(errors)
    print(f"{extra.name}: {'OK' if not errors else errors}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
