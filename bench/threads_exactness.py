"""Are a model's outputs bit-identical across intra-op thread counts? (The question that decides
whether an idle server may give a lone request all cores: see README, "Threads and exactness".)

For every built-in torch model and every catalogued layer, the canary photos are run at batch 1
and 4 with 1 thread and with every core, and the layers whose bytes differ are listed with the
largest difference. Nothing is asserted. (The server makes the same comparison itself, once per
batch shape, before it runs a shape wide: serving/_widening.py.)

    python bench/threads_exactness.py [--json results/threads.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

# Run as scripts (python bench/NAME.py): this folder is on sys.path.
from _common import machine, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from PIL import Image
    from skimage import data

    from embedwarden.server import available_cores, build_registry, process_flags
    from embedwarden.server.backbones import TorchBackbone
    from embedwarden.server.models import Preprocessor, read_verified

    cores = available_cores()
    mkl = process_flags()["mkl_reproducibility"]  # strict unless MKL_CBWR says otherwise
    print(f"MKL reproducibility: {mkl}")
    results: dict[str, Any] = {
        "machine": machine(),
        "threads": [1, cores],
        "mkl_reproducibility": mkl,
        "models": {},
    }
    for manifest in build_registry().all():
        if manifest.framework != "torch":
            continue
        backbone = TorchBackbone(manifest, read_verified(manifest)[1], "cpu")
        pre = Preprocessor(manifest.preprocess)
        photos = [pre(Image.fromarray(getattr(data, n)())) for n in ("chelsea", "coffee", "rocket")]
        batch = np.stack([*photos, photos[0]])
        layers = [layer.name for layer in manifest.layers]
        rows = {}
        for size in (1, 4):
            outputs = []
            for threads in (1, cores):
                out = backbone.infer(batch[:size], layers, threads=threads)
                outputs.append({k: np.array(v) for k, v in out.items()})
            one, many = outputs
            differing = [k for k in layers if one[k].tobytes() != many[k].tobytes()]
            rows[f"batch={size}"] = {
                "layers": len(layers),
                "differing": differing,
                "max_abs_diff": max(float(np.abs(one[k] - many[k]).max()) for k in layers),
            }
            worst = rows[f"batch={size}"]["max_abs_diff"]
            print(
                f"{manifest.ref} batch {size}: {len(differing)} of {len(layers)} layers differ "
                f"between 1 and {cores} threads (max |d| {worst:.3g})"
                + (f"; first: {differing[0]}" if differing else "")
            )
        results["models"][manifest.ref] = rows
        backbone.close()
    write_json(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
