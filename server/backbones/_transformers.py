"""Text backbones in PyTorch through Hugging Face `transformers` (e.g. all-MiniLM-L6-v2).

The architecture comes from the pinned `config.json` (`AutoModel.from_config`: the library's
own BERT, never a hand-written one) and the weights from the verified safetensors bytes with a
strict key match, so nothing is downloaded and nothing falls back to random initialisation.
Layers: `hidden.<k>` is the k-th hidden state (`hidden.0` the embedding output), `pooled` the
manifest's pooling over the last one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._errors import ManifestError
from .._frameworks import import_torch, run_torch_pass
from ..models import Manifest
from ._text_common import load_tokenizer, run_per_text, set_offline, token_nodes
from ._torch import module_checksum

torch = import_torch()

# Buffers that older `transformers` saved and current versions recompute (non-persistent).
DERIVED_KEYS = ("embeddings.position_ids",)


class TransformersBackbone:
    """A verified `transformers` encoder in eval mode; each text runs at its own length."""

    adapts_threads = False

    def __init__(self, manifest: Manifest, weights: bytes, device: str) -> None:
        set_offline()
        from safetensors.torch import load as load_safetensors
        from transformers import AutoModel

        self.manifest = manifest
        self.device = device
        assert manifest.tokenizer is not None
        if manifest.numerics.dtype != "float32":
            raise ManifestError(f"{manifest.ref}: text models run in float32")
        self.preprocessor, config = load_tokenizer(manifest)
        if config is None:
            raise ManifestError(f"{manifest.ref}: [architecture.options] must pin config_sha256")
        # "eager" attention: the plain softmax(QK^T)V of the reference implementation (SDPA
        # picks kernels by shape and device).
        model = AutoModel.from_config(config, attn_implementation="eager")  # type: ignore[no-untyped-call]
        state = load_safetensors(weights)
        expected_keys = model.state_dict().keys()
        for key in DERIVED_KEYS:
            if key in state and key not in expected_keys:
                value = state.pop(key).reshape(-1).long()
                if not torch.equal(value, torch.arange(value.numel())):
                    raise ManifestError(f"{manifest.ref}: {key} in the weights is not 0, 1, ...")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ManifestError(
                f"{manifest.ref}: weights do not match config.json: {exc}"
            ) from None
        model.eval()
        model.requires_grad_(False)
        self.model = model.to(device)
        self.wanted, self.pooled = token_nodes(manifest)
        depth = int(config.num_hidden_layers)
        if any(index > depth for index in self.wanted.values()):
            raise ManifestError(f"{manifest.ref}: the model has hidden states 0-{depth} only")
        self.width = int(config.hidden_size)
        self.spec = manifest.tokenizer

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        x = torch.from_numpy(ids).to(self.device)
        m = torch.from_numpy(mask).to(self.device)
        out = self.model(
            input_ids=x,
            attention_mask=m,
            token_type_ids=torch.zeros_like(x),
            output_hidden_states=True,
        )
        return [h.to("cpu", torch.float32).numpy() for h in out.hidden_states]

    def infer(
        self, batch: np.ndarray, layers: Sequence[str], threads: int = 0
    ) -> dict[str, np.ndarray]:
        wanted = {name: self.wanted[name] for name in layers if name in self.wanted}
        pooled = self.pooled if self.pooled in layers else None

        def forward() -> dict[str, np.ndarray]:
            with torch.inference_mode():
                return run_per_text(batch, self._forward, wanted, pooled, self.spec, self.width)

        return run_torch_pass(forward)

    def state_checksum(self) -> str:
        return module_checksum(self.model)

    def training_modules(self) -> list[str]:
        return [name or "<root>" for name, m in self.model.named_modules() if m.training]

    def set_training(self, module_name: str, training: bool) -> None:
        self.model.get_submodule(module_name).train(training)

    def close(self) -> None:
        del self.model
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
