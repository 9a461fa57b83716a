"""EfficientNet-Lite0 in torch vs its Keras port: load time, inference cost, and parity.

Backbone level (no gRPC), same preprocessed photos for both. Keras is measured three ways: the
serving path (a `tf.function` with a fixed input signature per layer set, called with
training=False), a direct eager call `model(x, training=False)`, and `model.predict(x)`. Rounds
are interleaved so every variant sees the same machine load; the median of `--rounds` is shown.
Then the parity report of the two on the four real photos (scikit-image chelsea, coffee, rocket,
astronaut), per layer. Nothing is asserted.

    python bench/keras_bench.py [--batches 1,8,32] [--rounds 5] [--threads N] [--json out.json]

On a machine whose cores are also busy with other work, torch's OpenMP pool degrades badly with
more than one thread (a descheduled thread stalls every barrier); compare with --threads 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from embedwarden.server import build_registry, configure_process, import_tensorflow
from embedwarden.server.backbones import load_backbone
from embedwarden.server.consistency import Tolerance, compare_arrays, to_channels_last
from embedwarden.server.models import Preprocessor

PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")


def _time(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: cores)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    # As the server does, before TensorFlow (which then takes the same thread count).
    configure_process(deterministic=True, torch_threads=args.threads)
    import torch

    tf = import_tensorflow()
    from skimage import data

    registry = build_registry()
    m_torch, m_keras = (
        registry.resolve(n) for n in ("efficientnet_lite0", "efficientnet_lite0_keras")
    )
    load_torch = time.perf_counter()
    torch_model, _ = load_backbone(m_torch, "cpu")
    load_torch = time.perf_counter() - load_torch
    load_keras = time.perf_counter()
    keras_model, _ = load_backbone(m_keras, "cpu")
    load_keras = time.perf_counter() - load_keras

    images = [Image.fromarray(getattr(data, name)()) for name in PHOTOS]
    x_torch = np.stack([Preprocessor(m_torch.preprocess)(i) for i in images])
    x_keras = np.stack([Preprocessor(m_keras.preprocess)(i) for i in images])

    trace = _time(lambda: keras_model.infer(x_keras[:1], ["features"]))
    model = keras_model.model
    results: dict[str, Any] = {
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "tensorflow": tf.__version__,
        },
        "load_seconds": {"torch": load_torch, "keras": load_keras},
        "keras_first_call_trace_seconds": trace,
        "per_batch": {},
    }
    for n in (int(b) for b in args.batches.split(",")):
        bt = np.ascontiguousarray(np.resize(x_torch, (n, *x_torch.shape[1:])))
        bk = np.ascontiguousarray(np.resize(x_keras, (n, *x_keras.shape[1:])))
        tk = tf.constant(bk)
        variants: dict[str, Callable[[], Any]] = {
            "torch (served)": lambda bt=bt: torch_model.infer(bt, ["logits"]),
            "keras tf.function (served)": lambda bk=bk: keras_model.infer(bk, ["logits"]),
            "keras eager call": lambda tk=tk: model(tk, training=False).numpy(),
            "keras predict": lambda bk=bk, n=n: model.predict(bk, batch_size=n, verbose=0),
        }
        for fn in variants.values():  # warm-up: traces, oneDNN primitive caches
            fn()
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                times[name].append(_time(fn))
        results["per_batch"][n] = {
            name: {
                "ms_per_batch": 1000 * statistics.median(t),
                "images_per_s": n / statistics.median(t),
            }
            for name, t in times.items()
        }
        print(f"batch {n}:")
        for name, r in results["per_batch"][n].items():
            print(f"  {name:<28} {r['ms_per_batch']:8.1f} ms/batch  {r['images_per_s']:6.1f} img/s")

    names = [layer.name for layer in m_torch.layers]
    out_t, out_k = torch_model.infer(x_torch, names), keras_model.infer(x_keras, names)
    tolerance = Tolerance.between(m_torch, m_keras)
    pre = float(np.abs(to_channels_last(x_torch, "CHW") - x_keras).max())
    print(f"\nparity on {', '.join(PHOTOS)}: preprocessed input max |A-B| {pre:g}")
    print(f"  {'layer':<10} {'max_abs_diff':>12} {'min_cosine':>20} {'top1':>5}")
    rows = []
    for layer in m_torch.layers:
        spec = m_keras.layer(layer.name)
        p = compare_arrays(
            layer.name,
            to_channels_last(out_t[layer.name], layer.layout),
            to_channels_last(out_k[layer.name], spec.layout),
            tolerance,
            classes=layer.name == "logits",
        )
        rows.append(vars(p))
        top1 = f"{p.top1_agreement:.2f}" if p.top1_agreement >= 0 else "-"
        print(f"  {p.layer:<10} {p.max_abs_diff:12.3g} {p.min_cosine:20.15f} {top1:>5}")
    top5 = [
        (np.argsort(-out_t["logits"][i])[:5].tolist(), np.argsort(-out_k["logits"][i])[:5].tolist())
        for i in range(len(PHOTOS))
    ]
    for name, (a, b) in zip(PHOTOS, top5, strict=True):
        print(f"  top-5 {name:<10} torch {a}  keras {b}")
    results["parity"] = {
        "preprocess_max_abs_diff": pre,
        "layers": rows,
        "top5": dict(zip(PHOTOS, top5, strict=True)),
    }
    print(
        f"\nload: torch {load_torch:.2f}s, keras {load_keras:.2f}s; keras first trace {trace:.2f}s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=float)


if __name__ == "__main__":
    main()
