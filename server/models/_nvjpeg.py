"""The `nvjpeg` decoder: JPEGs decoded on the GPU by nvJPEG, through torchvision.

A manifest picks it with `[preprocess] decoder = "nvjpeg"` (the default, `pillow`, decodes on the
CPU with libjpeg-turbo). nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's, so the
pixels differ, by about one level (test_gpu.py holds the mean |d| to 1.5 of 255 on a photo at
quality 90, and measures it where a GPU is present): the decoder is hashed into the
fingerprint like every other decode choice, and a version that names nvJPEG never falls back to
Pillow, which would serve other pixels under the same fingerprint. Without CUDA, without
torchvision's image ops, or with an nvJPEG that fails on a test image, such a model refuses to
load (`require`).

What nvJPEG decodes: JPEG files whose header Pillow reads as 3-component colour (mode RGB: YCbCr,
the camera and web norm), baseline or progressive, with `mode=ImageReadMode.RGB`. Greyscale and
CMYK JPEGs, MPO files and every other format take the Pillow path: the choice depends on the
bytes only, so it is as pinned as the rest of the contract. The header (size, pixel limit,
frames, mode) is read and checked by Pillow before nvJPEG sees the file.

What nvJPEG does not do, and the contract still does, on the host, after the copy back:
- EXIF orientation: torchvision applies `apply_exif_orientation` on the CPU only; its CUDA path
  ignores the tag. With `exif = "apply"` the decoded pixels are transposed as the Pillow path
  transposes them (the same tag, read by Pillow; a transpose is exact).
- ICC profiles: nvJPEG ignores an embedded profile (it returns the stored numbers as if they
  were sRGB). With `icc = "convert_to_srgb"` the decoded pixels go through the same LittleCMS
  conversion as on the Pillow path, so the policy is honoured, not refused; only the IDCT differs.

nvJPEG picks its backend per GPU: baseline JPEGs go to the hardware JPEG engine where the GPU has
one (A100, H100, H200), to the CUDA decoder elsewhere, progressive ones always to the CUDA
decoder. The fingerprint names nvJPEG, not the GPU; the consistency checks' canary photos go
through this decoder, so a move to a GPU whose nvJPEG decodes differently shows there as a
difference from the golden record (judged like any other change of environment).

torchvision 0.29 deprecates its image decoders in favour of TorchCodec (a DeprecationWarning per
call, which Python hides outside `__main__`); `decode_jpeg` is what the pinned torchvision ships.
"""

from __future__ import annotations

import io
import threading
from typing import Any

import numpy as np
from PIL import Image

from .._errors import FailedPrecondition, InvalidInput
from .._frameworks import import_torch

DEVICE = "cuda"
NVJPEG_MODES = frozenset({"RGB"})  # Pillow's mode of the JPEGs nvJPEG decodes
_probe_lock = threading.Lock()
_probed: list[str] = []  # "" once a probe decode succeeded, else the reason (kept, not retried)


def require(ref: str) -> None:
    """Raises FailedPrecondition unless nvJPEG decodes on this machine (probed once, with a tiny
    JPEG whose pixels must come back within a few levels of their encoded values)."""
    with _probe_lock:
        if not _probed:
            _probed.append(_probe())
        reason = _probed[0]
    if reason:
        raise FailedPrecondition(
            f"{ref}: its manifest pins decoder = 'nvjpeg' (JPEGs decoded on the GPU), but "
            f"{reason}; it does not fall back to Pillow (other pixels under the same "
            "fingerprint): serve it on a machine with a CUDA GPU, or use a version whose manifest "
            "says decoder = 'pillow'"
        )


def _probe() -> str:
    try:
        torch = import_torch()
    except ImportError as exc:
        return f"torch/torchvision cannot be imported ({exc})"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    pixels = np.full((16, 16, 3), (200, 100, 50), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    try:
        decoded = decode_rgb(buffer.getvalue(), 16, 16)
    except (RuntimeError, InvalidInput) as exc:
        return f"nvJPEG failed on a test image ({exc})"
    worst = int(np.abs(decoded.astype(np.int16) - pixels).max())
    return "" if worst <= 3 else f"nvJPEG decoded a test image {worst} levels off"


def decode_rgb(data: bytes, width: int, height: int) -> np.ndarray:
    """The JPEG `data` decoded by nvJPEG: uint8 height x width x 3 RGB, on the host."""
    torch, read_mode, decode_jpeg = _torchvision()
    encoded = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
    try:
        decoded = decode_jpeg(encoded, mode=read_mode.RGB, device=DEVICE)
        host = decoded.permute(1, 2, 0).contiguous().cpu().numpy()
    except torch.cuda.OutOfMemoryError:
        raise  # the server's trouble, not the caller's file
    except RuntimeError as exc:
        raise InvalidInput(f"nvJPEG could not decode the JPEG image: {exc}") from None
    if host.shape != (height, width, 3):
        raise InvalidInput(
            f"nvJPEG decoded the JPEG to {list(host.shape)}; its header says {width}x{height}"
        )
    return np.asarray(host, dtype=np.uint8)


def _torchvision() -> tuple[Any, Any, Any]:
    torch = import_torch()  # torch and torchvision first, as everywhere (see `_frameworks`)
    from torchvision.io import ImageReadMode, decode_jpeg

    return torch, ImageReadMode, decode_jpeg
