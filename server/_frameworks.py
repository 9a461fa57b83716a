"""Process-wide framework setup: import order, threads, determinism flags, device choice.

These settings are global to the process, so the server sets them once, at start, from its
Settings; no model loader touches them (co-loaded models would otherwise change each other's
numerics). The consistency monitor reports them and counts changes.

Import order matters: Triton's LLVM (pulled in by torch/torchvision) segfaults when it is loaded
after TensorFlow in one process, so torch, torchvision and triton are always imported first.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import TypeVar, cast

from ._settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")


# MKL's strict conditional numerical reproducibility: GEMM bytes that do not depend on the
# thread count. On an Intel Xeon (AVX-512) MKL splits the reduction of small GEMMs between
# threads: with EfficientNet-Lite's project convolutions as GEMMs (49 pixels x 1152 -> 320
# channels at 7x7) 6 of efficientnet_lite0's 19 layers differed between 1 and 2 threads (|d| <=
# 1.4e-5), so an idle server could not give a lone request both cores without changing a byte.
# In strict mode (the CPU's best code path, reductions in a fixed order) every layer gave the
# single-threaded bytes at 1 and 2 threads, batches 1 and 4; every feature layer kept the bytes
# of MKL's default at 1 thread (logits moved by about one ulp), and a pass took as long (paired
# runs, within 3%). MKL reads the mode once, at its first call: it is set before torch is
# imported, and an explicit MKL_CBWR is left alone. Where MKL started earlier, the wide-pass
# check still sees any difference and keeps that shape narrow.
MKL_CBWR_STRICT = "AUTO,STRICT"
_MKL_ALL = -1  # MKL_CBWR_ALL: every setting at once
_MKL_STRICT_BIT = 0x10000  # MKL_CBWR_STRICT
_MKL_BRANCHES = {1: "OFF", 2: "AUTO"}  # MKL_CBWR_BRANCH_OFF (MKL's default), MKL_CBWR_AUTO


def import_torch() -> ModuleType:
    os.environ.setdefault("MKL_CBWR", MKL_CBWR_STRICT)  # before MKL's first call
    import torch
    import torchvision  # noqa: F401  (loads its ops, and Triton, before any TensorFlow)

    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401
    return torch


def import_tensorflow() -> ModuleType:
    """TensorFlow, imported after torch, quiet, and without grabbing all GPU memory."""
    import_torch()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf_module

    tf: ModuleType = tf_module

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised: growth can no longer change
            log.warning("could not enable TensorFlow memory growth on %s", gpu.name)
    _configure_tensorflow_once(tf)
    return tf


_tf_configured: list[bool] = []  # appended to once, under the lock
_tf_lock = threading.Lock()


def _configure_tensorflow_once(tf: ModuleType) -> None:
    """TensorFlow's thread pools and determinism, set once, before its runtime starts.

    They mirror the torch flags `configure_process` already set (the server runs it before any
    model loads): as many intra-op threads as torch (the two frameworks share the cores, and
    TF's default is every core, on top of torch's), a small inter-op pool (CNN graphs are
    sequential), op determinism when torch runs deterministic algorithms, and TF32 only where
    torch allows it.
    """
    with _tf_lock:
        if _tf_configured:
            return
        _tf_configured.append(True)
    torch = import_torch()
    threads = pass_threads()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    except RuntimeError:  # the runtime started already (TensorFlow used before the server)
        log.warning("TensorFlow thread pools were already initialised; left as they are")
    if torch.are_deterministic_algorithms_enabled():
        tf.config.experimental.enable_op_determinism()
    # TensorFlow runs float32 matmuls/convolutions in TF32 on Ampere+ GPUs unless told not to.
    tf.config.experimental.enable_tensor_float_32_execution(
        bool(torch.backends.cuda.matmul.allow_tf32)
    )
    log.info("tensorflow %s: intra-op threads %d", tf.__version__, threads)


def _tf_op_determinism() -> str:
    try:  # no public getter; the setter is tf.config.experimental.enable_op_determinism
        from tensorflow.python.framework import config as tf_config

        return str(tf_config.is_op_determinism_enabled())
    except (ImportError, AttributeError):
        return "unknown"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def resolve_device(device: str) -> str:
    torch = import_torch()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            from ._errors import FailedPrecondition

            raise FailedPrecondition(f"--device {device}: no CUDA device is available")
        return device
    if device != "cpu":
        from ._errors import InvalidInput

        raise InvalidInput(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    return device


def plan_threads(settings: Settings, device: str) -> Settings:
    """Settings with the machine-dependent defaults (zeros) filled in.

    On CPU, EfficientNet-Lite0 on 2 cores runs 58-70 images/s as two single-threaded forward
    passes side by side, against 20-34 images/s as one pass with 2 intra-op threads: its many
    small (depthwise) convolutions spend more time in OpenMP barriers than in arithmetic. So
    the default is one lane per core (up to 4) and cores/lanes threads each. Batches stay small
    on CPU: a single-threaded pass of EfficientNet-Lite0 cost 19-21 ms an image at batch 2,
    22-27 at 4 and 35-38 at 8 (AMD EPYC; a batch's activations outgrow the core's caches), so
    single-threaded lanes take batches of up to 2 (8 clients: 71-80 against 61-66 images/s at
    4), multi-threaded ones up to 4 (not measured otherwise). On a GPU one lane feeds the
    device, with batches up to 32.
    """
    cores = available_cores()
    on_cpu = device == "cpu"
    lanes = settings.inference_lanes or (min(cores, 4) if on_cpu else 1)
    threads = settings.torch_threads or (max(1, cores // lanes) if on_cpu else cores)
    batch = settings.max_batch_size or ((2 if threads == 1 else 4) if on_cpu else 32)
    return replace(settings, inference_lanes=lanes, torch_threads=threads, max_batch_size=batch)


_pass_threads: list[int] = []  # [the configured intra-op threads per pass], once configured


def pass_threads() -> int:
    """The intra-op thread count of a torch forward pass unless told otherwise (the server's
    `--torch-threads`; this thread's own count where `configure_process` never ran)."""
    return _pass_threads[0] if _pass_threads else import_torch().get_num_threads()


@contextmanager
def torch_threads_for_pass(threads: int = 0) -> Iterator[None]:
    """Runs the block on this thread with `threads` intra-op threads (0: `pass_threads()`).

    Torch keeps the count per thread, but `set_num_threads` also sets the default that threads
    take on their first torch call. So every pass sets its count explicitly, whatever its
    thread started with, and the thread's count (after `configure_process`: 1) returns right
    after.
    """
    torch = import_torch()
    want = threads or pass_threads()
    before = torch.get_num_threads()
    if before != want:
        torch.set_num_threads(want)
    try:
        yield
    finally:
        if before != want:
            torch.set_num_threads(before)


class _TeamThread:
    """The one thread that runs the process's multi-threaded torch passes (`run_torch_pass`)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """A new thread; also in a forked child, which has none of its parent's threads (the
        parent's executor would queue the child's passes forever)."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-team")
        self._ident = 0

    def is_current(self) -> bool:
        return threading.get_ident() == self._ident

    def run(self, fn: Callable[[], T], threads: int) -> T:
        return self._executor.submit(self._enter, fn, threads).result()

    def _enter(self, fn: Callable[[], T], threads: int) -> T:
        self._ident = threading.get_ident()
        with torch_threads_for_pass(threads):
            return fn()


_TEAM_THREAD = _TeamThread()
os.register_at_fork(after_in_child=_TEAM_THREAD.reset)
_lanes_own_teams = [False]  # several multi-threaded lanes: each runs its narrow passes itself


def run_torch_pass(fn: Callable[[], T], threads: int = 0) -> T:
    """Runs `fn` (a forward pass) with `threads` intra-op threads (0: `pass_threads()`).

    OpenMP keeps one thread team per calling thread, and once two teams of two threads lived
    on 2 cores, every pass slowed down for good: wide passes alternating between two lanes took
    29 ms against 13 ms from one thread, and one consistency check on its own thread took a
    one-lane, two-thread server's lone request from 20-22 to 36-37 ms (EfficientNet-Lite0,
    AMD EPYC). So a pass of more than one thread runs on the process's one team thread. The
    exception is a narrow pass of several multi-threaded lanes (--inference-lanes > 1 with
    --torch-threads > 1, e.g. 4 x 4 on 16 cores): those teams run side by side by design, one
    per lane, and their sizes add up to the cores.
    """
    want = threads or pass_threads()
    direct = want == 1 or (want == pass_threads() and _lanes_own_teams[0])
    if direct or _TEAM_THREAD.is_current():
        with torch_threads_for_pass(want):
            return fn()
    return _TEAM_THREAD.run(fn, want)


def configure_process(*, deterministic: bool, torch_threads: int, lanes: int = 1) -> None:
    """Sets the process-wide numeric flags once, before any model loads (`lanes`: inference
    lanes per model, see `run_torch_pass`)."""
    if deterministic:
        # Must be set before the first cuBLAS handle exists.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch = import_torch()
    threads = torch_threads or available_cores()
    # Outside forward passes (loading weights, copies, checksums) torch runs on one thread on
    # every thread: a multi-threaded op there would start an OpenMP team of its own, and a
    # second team slows every pass (`run_torch_pass`). Passes set their own count.
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    _pass_threads[:] = [threads]
    _lanes_own_teams[0] = lanes > 1 and threads > 1
    torch.backends.cudnn.benchmark = not deterministic and torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    log.info("process flags: deterministic=%s torch_threads=%d", deterministic, threads)


def process_flags() -> dict[str, str]:
    """The process-wide settings that can change outputs, as strings (for the info metric)."""
    import numpy
    import PIL

    torch = import_torch()
    import torchvision

    flags = {
        "cudnn_benchmark": str(torch.backends.cudnn.benchmark),
        "cudnn_deterministic": str(torch.backends.cudnn.deterministic),
        "deterministic_algorithms": str(torch.are_deterministic_algorithms_enabled()),
        "cuda_matmul_tf32": str(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_tf32": str(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "torch_threads": str(pass_threads()),
        "torch_interop_threads": str(torch.get_num_interop_threads()),
        "onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
        "nvidia_tf32_override": os.environ.get("NVIDIA_TF32_OVERRIDE", "unset"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "cuda": str(torch.version.cuda),
        "mkldnn": str(torch.backends.mkldnn.is_available()),
        "mkl_reproducibility": mkl_reproducibility(),
    }
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        import keras

        flags["tensorflow"] = tf.__version__
        flags["keras"] = keras.__version__
        flags["tf_intra_op_threads"] = str(tf.config.threading.get_intra_op_parallelism_threads())
        flags["tf_inter_op_threads"] = str(tf.config.threading.get_inter_op_parallelism_threads())
        flags["keras_floatx"] = keras.config.floatx()
        flags["keras_image_data_format"] = keras.config.image_data_format()
        flags["keras_dtype_policy"] = keras.config.dtype_policy().name
        flags["tf_op_determinism"] = _tf_op_determinism()
        flags["tf_tf32"] = str(tf.config.experimental.tensor_float_32_execution_enabled())
    return flags


def mkl_reproducibility() -> str:
    """MKL's reproducibility mode as it runs ("AUTO,STRICT", "OFF", ...), read back from the
    MKL inside torch's CPU library; "unknown" where that build has no MKL (e.g. ARM)."""
    get = _mkl_cbwr_get()
    settings = get(_MKL_ALL) if get is not None else -1
    if settings < 0:  # no MKL, or an MKL error code
        return "unknown"
    branch = settings & 0xFFFF
    name = _MKL_BRANCHES.get(branch, f"branch {branch}")
    return f"{name},STRICT" if settings & _MKL_STRICT_BIT else name


@functools.cache
def _mkl_cbwr_get() -> Callable[[int], int] | None:
    """`mkl_cbwr_get`, looked up once per process (the flags are read at every check)."""
    library = Path(str(import_torch().__file__)).parent / "lib" / "libtorch_cpu.so"
    try:
        get = ctypes.CDLL(str(library)).mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    get.argtypes = [ctypes.c_int]
    get.restype = ctypes.c_int
    return cast(Callable[[int], int], get)
