"""Parity of two text models (e.g. all-MiniLM-L6-v2 in PyTorch vs its int8 ONNX export).

The same texts go through each model's own tokenizer and batcher. Stages compared: the token
arrays (ids and attention mask: exact unless the tokenizers differ), then every shared layer
as in `_parity`. Cosine alone hides ranking changes, so vector layers also report retrieval
agreement: each input text queries a fixed corpus (`CORPUS`, built here from fixed words, no
randomness) by cosine similarity in each model, and the overlap of the two top-10 neighbour
sets is averaged over the queries (1.0: the same ten neighbours; order within them ignored).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._errors import InvalidInput
from ..models import LayerSpec, TextInput
from ..serving import InputSource, LoadedModel
from ._canaries import canaries

TOP_K = 10
_SUBJECTS = (
    "A child",
    "The old fisherman",
    "Our neighbour",
    "A nurse",
    "The chef",
    "Two students",
    "A software engineer",
    "The orchestra",
)
_ACTIONS = (
    "is reading a book about volcanoes",
    "cooks pasta with fresh tomatoes",
    "repairs a bicycle in the garage",
    "plays the cello at the concert",
    "walks a dog along the beach",
    "debugs a memory leak in the server",
    "paints the fence bright blue",
    "waits for the train in the rain",
)
_PLACES = ("this morning.", "after a long week.")
CORPUS = tuple(f"{s} {a} {p}" for s in _SUBJECTS for a in _ACTIONS for p in _PLACES)


def text_inputs(sources: Sequence[InputSource]) -> list[TextInput]:
    texts = [s for s in sources if isinstance(s, TextInput)]
    if len(texts) != len(sources):
        raise InvalidInput("a parity report of text models takes text inputs only")
    if texts:
        return texts
    return [c.source for c in canaries("text") if isinstance(c.source, TextInput)]


def _unit(rows: np.ndarray) -> np.ndarray:
    flat = rows.reshape(len(rows), -1).astype(np.float64)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    out: np.ndarray = flat / np.where(norms > 0, norms, 1.0)
    return out


def top_k(queries: np.ndarray, corpus: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Indices of each query's k most cosine-similar corpus rows (ties broken by index)."""
    scores = _unit(queries) @ _unit(corpus).T
    order: np.ndarray = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order


def overlaps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per query, the fraction of neighbours two top-k index lists share."""
    return np.array([len(set(x) & set(y)) / len(x) for x, y in zip(a, b, strict=True)])


def retrieval_layers(pairs: Sequence[tuple[LayerSpec, LayerSpec]]) -> list[str]:
    return [la.name for la, _ in pairs if la.layout == "C"]


def corpus_tensors(model: LoadedModel) -> list[np.ndarray]:
    return [model.preprocessor.prepare(TextInput.of(t), 0) for t in CORPUS]
