"""Writes manifests for torchvision models from their weights entries (`embedwarden manifest`).

The preprocessing is read from the weights entry's `transforms()` (resize size, crop size,
interpolation, antialias, mean/std) and written out in full; the weights file is hashed; the layer
catalogue is every top-level stage (numbered children of top-level Sequentials too), the pooled
penultimate vector and the logits, with shapes measured by one dry run. Nothing is downloaded: the
weights file must already be on disk (torch hub cache or an explicit path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w

from .._errors import InvalidInput
from ..models import (
    RECOMMENDED_DECODE,
    decode_table,
    parse_manifest,
    sha256_file,
    torch_hub_checkpoints,
)
from ._torch import build_module, torch, torch_graph_nodes

_INTERPOLATIONS = {
    "BILINEAR": "bilinear",
    "BICUBIC": "bicubic",
    "NEAREST": "nearest",
    "LANCZOS": "lanczos",
    "BOX": "box",
    "HAMMING": "hamming",
}


def _weights_entry(arch: str, weights: str) -> Any:
    from torchvision import models

    try:
        enum = models.get_model_weights(arch)
    except ValueError as exc:
        raise InvalidInput(f"torchvision has no model {arch!r}: {exc}") from None
    try:
        return enum[weights]
    except KeyError:
        known = ", ".join(w.name for w in enum)
        raise InvalidInput(f"{arch} has no weights {weights!r}; known: {known}") from None


def _candidate_nodes(model: Any, nodes: list[str]) -> list[str]:
    """Top-level stages: each top-level child, or the numbered children of a Sequential."""
    out: list[str] = []
    for name, child in model.named_children():
        if isinstance(child, torch.nn.Sequential | torch.nn.ModuleList) and len(child) > 1:
            out.extend(f"{name}.{i}" for i in range(len(child)))
        else:
            out.append(name)
    for node in nodes:  # function nodes between stages, e.g. `flatten`
        if "." not in node and node not in out and node != "x":
            out.append(node)
    order = {n: i for i, n in enumerate(nodes)}

    def position(candidate: str) -> int:
        matches = [order[n] for n in nodes if n == candidate or n.startswith(candidate + ".")]
        return max(matches) if matches else -1

    return sorted((c for c in out if position(c) >= 0), key=position)


def torchvision_manifest(
    arch: str,
    weights: str,
    *,
    weights_file: Path | None = None,
    name: str | None = None,
    version: str = "1",
) -> str:
    """TOML text of a manifest for torchvision `arch` with weights entry `weights`."""
    from torchvision.models.feature_extraction import create_feature_extractor

    entry = _weights_entry(arch, weights)
    file_name = Path(entry.url).name
    path = weights_file or torch_hub_checkpoints() / file_name
    if not path.is_file():
        raise InvalidInput(
            f"weights file {path} not found; put {file_name} in the torch hub cache "
            "or pass --weights-file"
        )
    transform = entry.transforms()
    crop = int(transform.crop_size[0])
    resize = int(transform.resize_size[0])
    num_classes = len(entry.meta["categories"])
    model, leaves = build_module(_arch_spec(arch, num_classes))
    model.eval()
    nodes = torch_graph_nodes(model, leaves)
    candidates = _candidate_nodes(model, nodes)
    extractor = create_feature_extractor(model, return_nodes=candidates).eval()
    with torch.inference_mode():
        outputs = extractor(torch.zeros(1, 3, crop, crop))
    logits_node = candidates[-1]
    layers: list[dict[str, Any]] = []
    for node in candidates:
        shape = list(outputs[node].shape[1:])
        if len(shape) not in (1, 3):
            continue
        layer_name = "logits" if node == logits_node else node
        layers.append({"name": layer_name, "node": node, "shape": shape})
    vectors = [layer for layer in layers[:-1] if len(layer["shape"]) == 1]
    default_layer = vectors[-1]["name"] if vectors else layers[-2]["name"]
    data: dict[str, Any] = {
        "schema": 1,
        "name": name or arch,
        "version": version,
        "description": f"torchvision {arch} {weights}",
        "source": entry.url,
        "default_layer": default_layer,
        "architecture": {
            "framework": "torch",
            "builder": f"torchvision:{arch}",
            "num_classes": num_classes,
        },
        "weights": {"file": path.name, "sha256": sha256_file(path), "format": "torch_state_dict"},
        "preprocess": {
            "decoder": "pillow",
            "color_order": "RGB",
            "resize_mode": "resize_crop",
            "resize_size": resize,
            "size": crop,
            "interpolation": _INTERPOLATIONS[transform.interpolation.name],
            "antialias": True,
            "divisor": 255.0,
            "mean": [float(v) for v in transform.mean],
            "std": [float(v) for v in transform.std],
            "layout": "NCHW",
        },
        # Every decode field stated: the recommended contract (upright, colour-managed...).
        "decode": decode_table(RECOMMENDED_DECODE),
        "numerics": {"dtype": "float32", "deterministic": True},
        "layers": layers,
    }
    if weights_file is not None:
        data["weights"]["path"] = str(weights_file.resolve().parent)
    text = tomli_w.dumps(data)
    parse_manifest(text, origin=f"generated:{arch}")  # what we write must parse
    return text


def _arch_spec(arch: str, num_classes: int) -> Any:
    from ..models import ArchitectureSpec

    return ArchitectureSpec(
        framework="torch", builder=f"torchvision:{arch}", num_classes=num_classes
    )
