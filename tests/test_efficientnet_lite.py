"""The built-in default is a faithful EfficientNet-Lite0: strict key match, right classes,
stable golden embeddings.

Golden values live in tests/golden/; refresh them only on purpose with EMBEDWARDEN_ACCEPT=1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CAT_CLASSES, ESPRESSO, assert_close
from PIL import Image

from embedwarden.server import build_registry
from embedwarden.server.backbones._efficientnet_lite import efficientnet_lite0, same_padding
from embedwarden.server.backbones._torch import TorchBackbone
from embedwarden.server.models._preprocess import Preprocessor
from embedwarden.server.models._weights import read_verified

MANIFEST = build_registry().resolve("efficientnet_lite0")
GOLDEN = Path(__file__).parent / "golden" / "efficientnet_lite0@1.json"
# Same weights, same preprocessing, same library versions on another x86 CPU: oneDNN kernels may
# differ by a few ulp. Against the goldens (recorded on an AMD EPYC) max|d|/max|ref| measured
# 2.7e-6 on an AVX-512 Xeon and on its AVX2 path (1.9e-6 on logits, 4.1e-7 on the norm); 10x margin.
GOLDEN_REL = 5e-5


@pytest.fixture(scope="module")
def backbone() -> TorchBackbone:
    _, data = read_verified(MANIFEST)
    return TorchBackbone(MANIFEST, data, "cpu")


@pytest.fixture(scope="module")
def tensors(photo_arrays) -> dict[str, np.ndarray]:
    pre = Preprocessor(MANIFEST.preprocess)
    return {name: pre(Image.fromarray(a)) for name, a in photo_arrays.items()}


def test_same_padding_matches_tensorflow():
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(112, 5, 2) == (1, 2)
    assert same_padding(14, 5, 1) == (2, 2)


def test_every_key_of_the_state_dict_is_used():
    _, data = read_verified(MANIFEST)
    import io

    state = torch.load(io.BytesIO(data), weights_only=True)
    model = efficientnet_lite0()
    assert set(model.state_dict()) == set(state)
    model.load_state_dict(state, strict=True)


def test_logits_rank_the_right_imagenet_classes(backbone, tensors):
    batch = np.stack([tensors["chelsea"], tensors["coffee"]])
    logits = backbone.infer(batch, ["logits"])["logits"]
    top3_cat = set(np.argsort(logits[0])[::-1][:3].tolist())
    assert top3_cat <= CAT_CLASSES, top3_cat
    assert int(np.argmax(logits[1])) == ESPRESSO


def test_model_is_in_eval_mode_everywhere(backbone):
    backbone.infer(np.zeros((1, 3, 224, 224), np.float32), ["features", "stem"])
    assert backbone.training_modules() == []


def test_golden_embeddings(backbone, tensors):
    batch = np.stack([tensors[name] for name in sorted(tensors)])
    out = backbone.infer(batch, ["features", "logits"])
    current = {
        name: {
            "features_avg_head": out["features"][i].mean(axis=(1, 2))[:16].tolist(),
            "features_avg_norm": float(np.linalg.norm(out["features"][i].mean(axis=(1, 2)))),
            "logits_head": out["logits"][i][:16].tolist(),
            "top5": np.argsort(out["logits"][i])[::-1][:5].tolist(),
        }
        for i, name in enumerate(sorted(tensors))
    }
    if os.environ.get("EMBEDWARDEN_ACCEPT") == "1" or not GOLDEN.exists():
        if os.environ.get("EMBEDWARDEN_ACCEPT") != "1":
            pytest.fail(f"{GOLDEN} is missing; run with EMBEDWARDEN_ACCEPT=1 to record it")
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(
            json.dumps(
                {"model": MANIFEST.ref, "fingerprint": MANIFEST.fingerprint(), "photos": current},
                indent=1,
            )
            + "\n"
        )
    golden = json.loads(GOLDEN.read_text())
    assert golden["fingerprint"] == MANIFEST.fingerprint(), "manifest changed: re-record goldens"
    for name, values in golden["photos"].items():
        now = current[name]
        assert now["top5"][:1] == values["top5"][:1], name
        for key in ("features_avg_head", "logits_head", "features_avg_norm"):
            assert_close(now[key], values[key], rel=GOLDEN_REL, what=f"{name} {key}")
