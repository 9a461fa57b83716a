"""Text backbones on ONNX Runtime (e.g. the int8 export of all-MiniLM-L6-v2), CPU provider.

The session is built from the verified `.onnx` bytes. Numerics are pinned as far as ONNX Runtime
allows: deterministic compute, a fixed graph optimisation level, as many intra-op threads as
torch uses (the runtimes share the cores), no spinning. Only the outputs the graph has can be
served: `last_hidden_state` (layer node `hidden.<last>`) and `pooled` over it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._errors import FailedPrecondition, ManifestError
from .._frameworks import pass_threads
from ..models import Manifest
from ._text_common import load_tokenizer, run_per_text, token_nodes

OUTPUT = "last_hidden_state"


class OnnxTextBackbone:
    """An ONNX Runtime text encoder on the CPU (its threads are fixed when the session starts)."""

    adapts_threads = False

    def __init__(self, manifest: Manifest, weights: bytes, device: str) -> None:
        import onnxruntime as ort

        self.manifest = manifest
        self.device = device
        if device != "cpu":
            raise FailedPrecondition(
                f"{manifest.ref}: the onnxruntime backbone runs on the CPU only; serve it from a "
                "server started with --device cpu"
            )
        assert manifest.tokenizer is not None
        self.spec = manifest.tokenizer
        self.preprocessor, _config = load_tokenizer(manifest)
        options = ort.SessionOptions()
        options.intra_op_num_threads = pass_threads()
        options.inter_op_num_threads = 1
        options.use_deterministic_compute = True
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(weights, options, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self.session.get_inputs()}
        outputs = [o for o in self.session.get_outputs() if o.name == OUTPUT]
        if not outputs or not {"input_ids", "attention_mask"} <= self._inputs:
            raise ManifestError(
                f"{manifest.ref}: the ONNX graph needs inputs input_ids/attention_mask and "
                f"output {OUTPUT}"
            )
        self.width = int(outputs[0].shape[-1])
        self.wanted, self.pooled = token_nodes(manifest)
        self.last = int(manifest.architecture.options.get("num_hidden_layers", 0))
        if any(index != self.last for index in self.wanted.values()):
            raise ManifestError(
                f"{manifest.ref}: an ONNX export serves its last hidden state only "
                f"(hidden.{self.last})"
            )
        self._digest = manifest.weights.sha256  # `weights` were verified against it

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        (states,) = self.session.run([OUTPUT], feeds)
        return [np.asarray(states, dtype=np.float32)]

    def infer(
        self, batch: np.ndarray, layers: Sequence[str], threads: int = 0
    ) -> dict[str, np.ndarray]:
        wanted = {name: 0 for name in layers if name in self.wanted}
        pooled = self.pooled if self.pooled in layers else None
        return run_per_text(batch, self._forward, wanted, pooled, self.spec, self.width)

    def state_checksum(self) -> str:
        """The session holds the verified graph bytes (initializers included) and nothing a
        request can change: the checksum is theirs."""
        return self._digest

    def training_modules(self) -> list[str]:
        return []  # an inference session has no training mode

    def set_training(self, module_name: str, training: bool) -> None:
        raise ManifestError(f"{self.manifest.ref}: an ONNX session has no module {module_name!r}")

    def close(self) -> None:
        del self.session
