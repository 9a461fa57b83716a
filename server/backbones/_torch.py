"""PyTorch backbones: the built-in EfficientNet-Lite and any torchvision classification model.

Intermediate layers come from `torchvision.models.feature_extraction.create_feature_extractor`
(one extractor per requested layer set, cached). Two traps are closed here:
- a fresh extractor is in training mode: every extractor is put in eval mode, and the load fails
  if any submodule is still training;
- in-place ops (ReLU(inplace=True), `+=`, `relu_`) would overwrite a captured tensor: they are
  rewritten out of place in the model and in every traced graph.

On CPU a pass runs through a TorchScript trace of its extractor when, and only when, the trace
gave bit-identical outputs to the eager extractor on the first batch of that shape: the traced
graph runs in C++ without taking the GIL for every module call, which lets two lanes and the
decode threads share 2 cores better (1.14-1.46x images/s measured, EfficientNet-Lite0).
"""

from __future__ import annotations

import hashlib
import io
import logging
import operator
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np

from .._errors import ManifestError
from .._frameworks import import_torch, run_torch_pass
from ..models import ArchitectureSpec, Manifest

torch = import_torch()
from torch import fx, nn  # noqa: E402
from torchvision import models as tv_models  # noqa: E402
from torchvision.models.feature_extraction import (  # noqa: E402
    create_feature_extractor,
    get_graph_node_names,
)

from ._efficientnet_lite import MBConvBlock, efficientnet_lite0  # noqa: E402

log = logging.getLogger(__name__)


def module_checksum(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, bytes): the in-memory weights."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in (*model.named_parameters(), *model.named_buffers()):
            digest.update(name.encode())
            digest.update(str(tensor.dtype).encode())
            raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            digest.update(raw.numpy().tobytes())
    return digest.hexdigest()


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_OUT_OF_PLACE_FUNCTIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}
MAX_CACHED_EXTRACTORS = 16
MAX_CACHED_TRACES = 64
_Pass = Callable[[Any], dict[str, Any]]
K = TypeVar("K")
V = TypeVar("V")


def build_module(arch: ArchitectureSpec) -> tuple[nn.Module, list[type[nn.Module]]]:
    """The untrained architecture, and the module classes torch.fx must treat as leaves."""
    options = dict(arch.options)
    if arch.builder == "efficientnet_lite0":
        return efficientnet_lite0(num_classes=arch.num_classes, **options), [MBConvBlock]
    if arch.builder.startswith("torchvision:"):
        name = arch.builder.split(":", 1)[1]
        if name not in tv_models.list_models(module=tv_models):
            raise ManifestError(
                f"architecture.builder: torchvision has no classification model {name!r}"
            )
        # weights=None: never download; the verified state dict is loaded afterwards.
        return tv_models.get_model(name, weights=None, num_classes=arch.num_classes, **options), []
    raise ManifestError(
        f"architecture.builder {arch.builder!r}: expected 'efficientnet_lite0' or "
        "'torchvision:<model name>'"
    )


def _disable_inplace_modules(model: nn.Module) -> None:
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            setattr(module, "inplace", False)  # noqa: B010 - not every module declares it


def _disable_inplace_graph(graph_module: fx.GraphModule) -> None:
    changed = False
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target in _OUT_OF_PLACE_FUNCTIONS:
            node.target = _OUT_OF_PLACE_FUNCTIONS[node.target]
            changed = True
        elif node.op == "call_function" and node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
            changed = True
        elif (
            node.op == "call_method"
            and isinstance(node.target, str)
            and node.target.endswith("_")
            and not node.target.startswith("_")
            and hasattr(torch.Tensor, node.target[:-1])
        ):
            node.target = node.target[:-1]
            changed = True
    if changed:
        graph_module.recompile()


class _TraceGuard:
    """Keeps torch.fx tracing and forward passes apart, process-wide.

    `fx.Tracer.trace` patches `torch.nn.Module.__call__` and `__getattr__` on the class for the
    duration of a trace: a forward pass of any other model on another thread meanwhile runs
    through the tracer and fails ("module is not installed as a submodule") or records into the
    wrong graph. Tracing (a model load, a new layer set) takes the guard exclusively; forward
    passes share it. Waiting tracers keep new forward passes out, so a trace is not starved.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._tracing = False

    @contextmanager
    def forward(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._tracing)
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                if self._running == 0:
                    self._cond.notify_all()

    @contextmanager
    def trace(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._tracing)
            self._tracing = True
            self._cond.wait_for(lambda: self._running == 0)
        try:
            yield
        finally:
            with self._cond:
                self._tracing = False
                self._cond.notify_all()


FX_GUARD = _TraceGuard()


def _training_submodules(model: nn.Module) -> list[str]:
    return [name or "<root>" for name, module in model.named_modules() if module.training]


class TorchBackbone:
    """A verified torch model in eval mode, on one device, serving catalogued layers."""

    adapts_threads = True

    def __init__(self, manifest: Manifest, weights: bytes, device: str) -> None:
        self.manifest = manifest
        self.device = device
        self.on_gpu = device.startswith("cuda")
        self.dtype = TORCH_DTYPES[manifest.numerics.dtype]
        if self.dtype is torch.float16 and not self.on_gpu:
            raise ManifestError(f"{manifest.ref}: float16 inference needs a CUDA device")
        model, self._leaf_modules = build_module(manifest.architecture)
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and len(state) <= 4:
            state = state["state_dict"]
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ManifestError(
                f"{manifest.ref}: weights do not match architecture "
                f"{manifest.architecture.builder}: {exc}"
            ) from None
        model.eval()
        model.requires_grad_(False)
        _disable_inplace_modules(model)
        # channels_last: oneDNN (CPU) and cuDNN (GPU) convolutions are faster in NHWC memory;
        # on 2 CPU cores EfficientNet-Lite0 runs about 1.4x faster at batch 4.
        model = model.to(device=device, dtype=self.dtype)
        self.model = model.to(memory_format=torch.channels_last)
        self._nodes = {layer.name: layer.node for layer in manifest.layers}
        self._check_nodes()
        self._extractors: dict[tuple[str, ...], fx.GraphModule] = {}
        # (layers, input shape, dtype) -> the verified trace, or None where eager must serve.
        self._traces: dict[tuple[Any, ...], _Pass | None] = {}
        self._tracing: set[tuple[Any, ...]] = set()  # keys being traced now (~0.4 s each)
        self._lock = threading.Lock()
        self._trace_passes = not self.on_gpu

    def _check_nodes(self) -> None:
        with FX_GUARD.trace():
            _train_nodes, eval_nodes = get_graph_node_names(
                self.model, tracer_kwargs={"leaf_modules": self._leaf_modules}
            )
        # As in create_feature_extractor, a module name stands for the last node inside it.
        missing = sorted(
            node
            for node in set(self._nodes.values())
            if not any(n == node or n.startswith(node + ".") for n in eval_nodes)
        )
        if missing:
            raise ManifestError(
                f"{self.manifest.ref}: layer nodes {missing} are not in the model's graph "
                f"(some valid nodes: {eval_nodes[:5]} ... {eval_nodes[-5:]})"
            )

    def _extractor(self, layers: tuple[str, ...]) -> fx.GraphModule:
        with self._lock:
            extractor = self._extractors.get(layers)
            if extractor is None:
                with FX_GUARD.trace():
                    extractor = create_feature_extractor(
                        self.model,
                        return_nodes={self._nodes[name]: name for name in layers},
                        tracer_kwargs={"leaf_modules": self._leaf_modules},
                    )
                extractor.eval()  # a fresh extractor starts in training mode
                _disable_inplace_graph(extractor)
                training = _training_submodules(extractor)
                if training:
                    raise RuntimeError(f"extractor submodules still training: {training[:5]}")
                _put_bounded(self._extractors, layers, extractor, MAX_CACHED_EXTRACTORS)
            return extractor

    def infer(
        self, batch: np.ndarray, layers: Sequence[str], threads: int = 0
    ) -> dict[str, np.ndarray]:
        key = tuple(sorted(set(layers)))
        extractor = self._extractor(key)  # may trace: before taking the forward guard
        return run_torch_pass(lambda: self._forward(key, extractor, batch), threads)

    def _forward(
        self, layers: tuple[str, ...], extractor: fx.GraphModule, batch: np.ndarray
    ) -> dict[str, np.ndarray]:
        with FX_GUARD.forward(), torch.inference_mode():
            x = torch.from_numpy(batch)
            if self.on_gpu:
                x = x.pin_memory().to(self.device, non_blocking=True)
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            if x.dtype is not self.dtype:
                x = x.to(self.dtype)
            outputs = self._run(layers, extractor, x)
            return {
                name: value.to(device="cpu", dtype=torch.float32).contiguous().numpy()
                for name, value in outputs.items()
            }

    def _run(self, layers: tuple[str, ...], extractor: fx.GraphModule, x: Any) -> dict[str, Any]:
        """One pass: through the verified trace for this input shape where there is one."""
        if not self._trace_passes:
            return dict(extractor(x))
        key = (layers, tuple(x.shape), x.dtype)
        with self._lock:
            known = key in self._traces or key in self._tracing
            traced = self._traces.get(key)
            if not known:  # this pass traces; a lane meeting the shape meanwhile runs eagerly
                self._tracing.add(key)
        if traced is not None:
            return traced(x)
        outputs: dict[str, Any] = extractor(x)
        if not known:
            try:
                self._remember_trace(key, extractor, x, outputs)
            finally:
                with self._lock:
                    self._tracing.discard(key)
        return outputs

    def _remember_trace(
        self, key: tuple[Any, ...], extractor: fx.GraphModule, x: Any, eager: dict[str, Any]
    ) -> None:
        """Traces `extractor` on `x` and keeps the trace only if it reproduces `eager` exactly."""
        traced: _Pass | None = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.trace is deprecated (FutureWarning)
                candidate = torch.jit.trace(extractor, x, check_trace=False, strict=False)
            # Twice: the profiling executor optimises the graph after its first runs.
            for _ in range(2):
                outputs = candidate(x)
                if outputs.keys() != eager.keys() or not all(
                    torch.equal(outputs[name], eager[name]) for name in eager
                ):
                    raise ValueError("outputs differ from the eager extractor's")
            traced = candidate
        except Exception as exc:  # any failure keeps the eager pass
            log.info("%s: layers %s served eagerly (%s)", self.manifest.ref, list(key[0]), exc)
        with self._lock:
            if not self._trace_passes:
                return  # a module left eval mode meanwhile: the trace has eval mode baked in
            _put_bounded(self._traces, key, traced, MAX_CACHED_TRACES)

    def state_checksum(self) -> str:
        return module_checksum(self.model)

    def training_modules(self) -> list[str]:
        names = _training_submodules(self.model)
        with self._lock:
            for key, extractor in self._extractors.items():
                names.extend(f"extractor{list(key)}:{n}" for n in _training_submodules(extractor))
        return names

    def set_training(self, module_name: str, training: bool) -> None:
        """Fault injection for the drift checks: traces bake eval mode in, so while any module
        trains every pass runs eagerly."""
        with self._lock:
            self.model.get_submodule(module_name).train(training)
            self._traces.clear()
            self._trace_passes = not self.on_gpu and not _training_submodules(self.model)

    def close(self) -> None:
        with self._lock:
            self._extractors.clear()
            self._traces.clear()
        del self.model
        if self.on_gpu:
            torch.cuda.empty_cache()


def _put_bounded(cache: dict[K, V], key: K, value: V, limit: int) -> None:
    """Stores `value`, first dropping the oldest entry when `cache` holds `limit` already."""
    if len(cache) >= limit:
        cache.pop(next(iter(cache)))
    cache[key] = value


def torch_graph_nodes(model: nn.Module, leaf_modules: list[type[nn.Module]]) -> list[str]:
    """Eval-mode node names, for catalogue generation."""
    with FX_GUARD.trace():
        return list(get_graph_node_names(model, tracer_kwargs={"leaf_modules": leaf_modules})[1])
