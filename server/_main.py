"""`embedwarden serve` / `python -m embedwarden.server`: parse settings, configure logging, run."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence

from . import _settings


def main(argv: Sequence[str] | None = None) -> int:
    settings = _settings.parse(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Our own --max-image-pixels check refuses big images; Pillow's warning is noise.
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    from ._app import serve  # heavy imports (torch) only once settings parsed
    from ._errors import EmbedwardenError

    try:
        return serve(settings)
    except EmbedwardenError as exc:
        logging.getLogger("embedwarden").error("cannot start: %s", exc)
        return 2
