"""Client methods for cross-model parity reports (AdminService.CompareModels)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from embedwarden.v1 import admin_pb2

from ._base import ClientBase
from ._types import ImageLike, ModelIdentity, Text, image_input, model_ref


@dataclass(frozen=True)
class LayerParity:
    layer: str
    max_abs_diff: float
    min_cosine: float
    mean_cosine: float
    top1_agreement: float  # fraction of inputs with the same argmax; -1 on non-class layers
    # Text vector layers: top-10 neighbours of each input among a fixed corpus, shared by the
    # two models (mean and least fraction); -1 elsewhere.
    retrieval_overlap: float = -1.0
    retrieval_min_overlap: float = -1.0


@dataclass(frozen=True)
class ParityReport:
    """Where and how far two models disagree on the same inputs (arrays compared channels-last).

    `first_divergence` is the first stage beyond float rounding: "preprocess", a layer, or ""."""

    model_a: ModelIdentity
    model_b: ModelIdentity
    inputs: int
    preprocess_max_abs_diff: float
    layers: tuple[LayerParity, ...]
    first_divergence: str

    def layer(self, name: str) -> LayerParity:
        for entry in self.layers:
            if entry.layer == name:
                return entry
        raise KeyError(f"{name!r} was not compared; compared: {[e.layer for e in self.layers]}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_proto(cls, response: admin_pb2.CompareModelsResponse) -> ParityReport:
        return cls(
            model_a=ModelIdentity.from_proto(response.model_a),
            model_b=ModelIdentity.from_proto(response.model_b),
            inputs=int(response.inputs),
            preprocess_max_abs_diff=response.preprocess_max_abs_diff,
            layers=tuple(
                LayerParity(
                    layer=p.layer,
                    max_abs_diff=p.max_abs_diff,
                    min_cosine=p.min_cosine,
                    mean_cosine=p.mean_cosine,
                    top1_agreement=p.top1_agreement,
                    retrieval_overlap=p.retrieval_overlap,
                    retrieval_min_overlap=p.retrieval_min_overlap,
                )
                for p in response.layers
            ),
            first_divergence=response.first_divergence,
        )


class ParityAPI(ClientBase):
    def compare_models(
        self,
        a: str,
        b: str,
        layers: str | Sequence[str] | None = None,
        images: Sequence[ImageLike] | None = None,
        timeout: float | None = None,
        texts: Sequence[str] | None = None,
    ) -> ParityReport:
        """Runs the same images (default: the server's canaries) through models `a` and
        `b` ("NAME" or "NAME@VERSION", both loaded) and reports, per shared layer, the max
        absolute difference, min/mean cosine and top-1 agreement, the difference of the
        preprocessed inputs, and where the two start to diverge. Text models take `texts` and
        add top-10 retrieval overlap on vector layers."""
        if texts is not None:
            images = [*(images or []), *(Text(t) for t in texts)]
        request = admin_pb2.CompareModelsRequest(
            model_a=model_ref(a),
            model_b=model_ref(b),
            layers=[layers] if isinstance(layers, str) else list(layers or []),
            inputs=[image_input(i) for i in images or []],
        )
        response = self._call(self._admin.CompareModels, request, timeout)
        return ParityReport.from_proto(response)
