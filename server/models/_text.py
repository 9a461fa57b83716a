"""Text inputs and their preparation: UTF-8 checks and tokenisation as a text manifest pins it.

The tokenizer object itself comes from the backbone package (it needs the `transformers`
library); this module only fixes what a prepared text looks like, so that the serving layer
and the consistency checks handle texts and images alike: one int64 array per input, of shape
[2, max_length] (token ids, then the attention mask; padding has mask 0). The backbone runs
each text at its own length (see `backbones/_text_common.py`), so the padding here never
reaches the model: it only lets texts travel through the batcher as equal-shaped arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .._errors import InvalidInput, LimitExceeded
from ._manifest import TokenizerSpec

# Bytes of UTF-8 per text: 64 KiB is far beyond max_length tokens of any prose (256 tokens are
# about 1-2 KiB of English); beyond it a request is refused rather than tokenised and truncated.
MAX_TEXT_BYTES = 64 << 10


@dataclass(frozen=True)
class TextInput:
    """One text, as sent (UTF-8 bytes, checked when prepared)."""

    data: bytes

    @classmethod
    def of(cls, text: str) -> TextInput:
        return cls(text.encode("utf-8"))


def check_text(source: TextInput, max_bytes: int = MAX_TEXT_BYTES) -> str:
    if len(source.data) > max_bytes:
        raise LimitExceeded(
            f"text of {len(source.data)} bytes; the limit is {max_bytes} bytes of UTF-8 per text "
            "(split it, or send a shorter passage)"
        )
    try:
        text = source.data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise InvalidInput(
            f"text is not valid UTF-8 (byte {exc.start}: {exc.reason}); send UTF-8 encoded text"
        ) from None
    if not text.strip():
        raise InvalidInput("text is empty or only whitespace")
    return text


# Texts -> (input_ids, attention_mask), each [n, max_length] int64, truncated and padded.
Tokenize = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]


class TextPreprocessor:
    """Tokenises one text into the [2, max_length] int64 array the text backbones take."""

    def __init__(self, spec: TokenizerSpec, tokenize: Tokenize) -> None:
        self.spec = spec
        self._tokenize = tokenize

    def tokens(self, texts: Sequence[str]) -> np.ndarray:
        ids, mask = self._tokenize(texts)
        return np.ascontiguousarray(np.stack([ids, mask], axis=1), dtype=np.int64)

    def prepare(self, source: object, max_pixels: int = 0) -> np.ndarray:
        """`max_pixels` is ignored (the image preprocessor's signature)."""
        if not isinstance(source, TextInput):
            raise InvalidInput("this is a text model: send `text` inputs, not images")
        tokens: np.ndarray = self.tokens([check_text(source)])[0]
        return tokens
