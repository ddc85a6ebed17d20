"""A small kustomize, enough for deploy/k8s (resources, namespace, images, JSON 6902 patches by
target kind, configMapGenerator merging literals), so the manifests can be rendered and checked
where no kustomize binary is installed. tests/test_kubernetes.py checks it renders exactly what
`kubectl kustomize` does wherever kubectl is present. Anything else in a kustomization fails."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "patches", "configMapGenerator"}


def _pointer(doc: Any, path: str) -> tuple[Any, str | int]:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    for part in parts[:-1]:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    last: str | int = parts[-1]
    if isinstance(doc, list):
        last = len(doc) if last == "-" else int(last)
    return doc, last


def _apply(doc: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    for op in ops:
        parent, key = _pointer(doc, op["path"])
        if op["op"] == "remove":
            del parent[key]
        elif op["op"] == "replace":
            parent[key]  # noqa: B018 - must exist
            parent[key] = copy.deepcopy(op["value"])
        elif op["op"] == "add":
            if isinstance(parent, list):
                parent.insert(int(key), copy.deepcopy(op["value"]))
            else:
                parent[key] = copy.deepcopy(op["value"])
        else:
            raise ValueError(f"unsupported patch op {op['op']!r}")


def render(folder: Path) -> list[dict[str, Any]]:
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise ValueError(f"{folder}: kustomization fields not supported here: {sorted(unknown)}")
    docs: list[dict[str, Any]] = []
    for resource in spec.get("resources", []):
        path = folder / resource
        if path.is_dir():
            docs += render(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for image in spec.get("images", []):
        ref = image.get("newName", image["name"]) + (f":{image['newTag']}" if "newTag" in image else "")
        if "digest" in image:
            ref = image.get("newName", image["name"]) + f"@{image['digest']}"
        for doc in docs:
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                if c["image"].split("@")[0].rsplit(":", 1)[0] == image["name"] or c["image"] == image["name"]:
                    c["image"] = ref
    for patch in spec.get("patches", []):
        ops = yaml.safe_load(patch["patch"])
        for doc in docs:
            if all(doc.get("kind") == v if k == "kind" else doc["metadata"].get(k) == v
                   for k, v in patch["target"].items()):
                _apply(doc, ops)
    for generator in spec.get("configMapGenerator", []):
        assert generator.get("behavior") == "merge", "only merging into a base ConfigMap is supported"
        (target,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == generator["name"]]
        for literal in generator.get("literals", []):
            key, _, value = literal.partition("=")
            target.setdefault("data", {})[key] = value
    if "namespace" in spec:
        for doc in docs:
            doc["metadata"]["namespace"] = spec["namespace"]
    return docs
