"""Wide passes: an idle CPU server runs a lone batch on all its lanes' cores, and still serves
the bytes that the narrow (single-lane thread count) pass defines."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from helpers import make_settings

from embedwarden.client import Client
from embedwarden.server import build_registry, pass_threads, process_flags
from embedwarden.server._metrics import METRICS
from embedwarden.server.backbones import TorchBackbone
from embedwarden.server.models import Preprocessor, read_verified
from embedwarden.server.serving import WidePasses
from embedwarden.server.testing import ServerThread

MODEL = "efficientnet_lite0"


class ThreadCountBackbone:
    """A backbone whose output is its pass's thread count: the bytes of a model whose kernels
    split their reductions by thread, in the extreme."""

    adapts_threads = True

    def __init__(self) -> None:
        self.manifest = build_registry().resolve(MODEL)
        self.device = "cpu"
        self.calls: list[int] = []
        self.wide_threads: set[int] = set()  # the threads that ran its wide passes

    def infer(
        self, batch: np.ndarray, layers: Sequence[str], threads: int = 0
    ) -> dict[str, np.ndarray]:
        used = threads or pass_threads()
        self.calls.append(used)
        if used != pass_threads():
            self.wide_threads.add(threading.get_ident())
        return {name: np.full((len(batch), 1), used, np.float32) for name in layers}


def test_a_shape_whose_bytes_depend_on_threads_stays_narrow() -> None:
    backbone = ThreadCountBackbone()
    checks: list[bool] = []
    passes = WidePasses(backbone, pass_threads() + 1, checks.append)  # type: ignore[arg-type]
    batch = np.zeros((2, 3), np.float32)
    narrow = pass_threads()
    for _ in range(3):
        out = passes.run(batch, ["a"], wide=True)
        assert out["a"].tolist() == [[narrow], [narrow]]  # the narrow bytes, every time
    assert checks == [False]  # compared once, then remembered
    assert passes.identical_shapes() == {((2, 3), ("a",)): False}
    assert backbone.calls == [narrow, narrow + 1, narrow, narrow]


def test_every_multithreaded_pass_of_the_process_runs_on_one_thread() -> None:
    """Wide passes from any lane, and passes of the monitor's threads: OpenMP keeps a team per
    calling thread, and with two teams alive on 2 cores every pass ran 1.8-2.2x slower.
    Single-threaded passes stay on their caller."""
    import torch

    from embedwarden.server._frameworks import run_torch_pass

    wide = pass_threads() + 1  # never a lane's own narrow count
    ran: list[tuple[int, int, int]] = []  # (caller, runner, threads seen)

    def pass_of(caller: int, threads: int) -> None:
        def forward() -> None:
            ran.append((caller, threading.get_ident(), torch.get_num_threads()))

        run_torch_pass(forward, threads)

    def lane() -> None:
        for threads in (wide, 1, wide):
            pass_of(threading.get_ident(), threads)

    lanes = [threading.Thread(target=lane) for _ in range(3)]
    for thread in lanes:
        thread.start()
    for thread in lanes:
        thread.join()
    pass_of(threading.get_ident(), wide)
    multi = [r for r in ran if r[2] == wide]
    assert len(multi) == 7 and len({runner for _, runner, _ in multi}) == 1
    assert all(runner != caller for caller, runner, _ in multi)
    single = [r for r in ran if r[2] != wide]
    assert len(single) == 3 and all(runner == caller and n == 1 for caller, runner, n in single)


def test_torch_outside_passes_runs_single_threaded_on_every_thread() -> None:
    """Loading weights, copies and checksums start no OpenMP team of their own; a pass sets its
    count and gives it back."""
    import torch

    from embedwarden.server import configure_process
    from embedwarden.server._frameworks import _lanes_own_teams, torch_threads_for_pass

    configure_process(  # as configured already: only the process default is under test
        deterministic=torch.are_deterministic_algorithms_enabled(),
        torch_threads=pass_threads(),
        lanes=2 if _lanes_own_teams[0] else 1,
    )
    seen: list[int] = []

    def fresh_thread() -> None:
        seen.append(torch.get_num_threads())
        with torch_threads_for_pass(pass_threads() + 1):
            seen.append(torch.get_num_threads())
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=fresh_thread)
    thread.start()
    thread.join()
    assert seen == [1, pass_threads() + 1, 1]
    assert torch.get_num_threads() == 1


def test_efficientnet_lite0_widens_exactly_where_one_and_two_threads_agree(
    photo_arrays: dict[str, np.ndarray],
) -> None:
    """The per-shape verdict is the truth on this CPU, and the served bytes are always the
    narrow ones. With MKL in strict reproducibility mode (the server's default) every layer
    agrees at batches 1 and 3: on an AMD EPYC it did with the pointwise GEMMs alone, and on an
    Intel Xeon, where MKL splits those GEMMs by thread, 6 of 19 layers (from blocks.12, |d| <=
    1.4e-5) differed until strict mode; a shape that disagrees anywhere stays narrow."""
    from PIL import Image

    manifest = build_registry().resolve(MODEL)
    backbone = TorchBackbone(manifest, read_verified(manifest)[1], "cpu")
    pre = Preprocessor(manifest.preprocess)
    tensors = np.stack([pre(Image.fromarray(a)) for a in photo_arrays.values()])
    layers = [layer.name for layer in manifest.layers]
    checks: list[bool] = []
    passes = WidePasses(backbone, 2, checks.append)
    narrow_threads = pass_threads()
    agreed: list[bool] = []
    for size in (1, 3):
        narrow = backbone.infer(tensors[:size], layers, threads=narrow_threads)
        two = backbone.infer(tensors[:size], layers, threads=2)
        agreed.append(all(narrow[n].tobytes() == two[n].tobytes() for n in layers))
        served = passes.run(tensors[:size], layers, wide=True)  # compares: the narrow bytes
        again = passes.run(tensors[:size], layers, wide=True)  # wide only if they agreed
        for name in layers:
            assert served[name].tobytes() == narrow[name].tobytes(), f"batch {size}, {name}"
            assert again[name].tobytes() == narrow[name].tobytes(), f"batch {size}, {name}"
    assert checks == agreed
    if process_flags()["mkl_reproducibility"] == "AUTO,STRICT":
        assert all(agreed), "strict MKL, and still the bytes depend on the thread count"


_EVERY_LAYER = """
import sys
import numpy as np
from skimage import data
from PIL import Image
from embedwarden.server import build_registry, configure_process, process_flags
from embedwarden.server.backbones import TorchBackbone
from embedwarden.server.models import Preprocessor, read_verified
configure_process(deterministic=True, torch_threads=int(sys.argv[1]))
manifest = build_registry().resolve("efficientnet_lite0")
backbone = TorchBackbone(manifest, read_verified(manifest)[1], "cpu")
pre = Preprocessor(manifest.preprocess)
batch = np.stack([pre(Image.fromarray(getattr(data, n)())) for n in ("chelsea", "coffee")])
out = backbone.infer(batch, [layer.name for layer in manifest.layers])
np.savez(sys.argv[2], **{name: np.asarray(array) for name, array in out.items()})
print(process_flags()["mkl_reproducibility"])
"""


def _every_layer_in_a_fresh_process(
    threads: int, mkl_cbwr: str | None, path: Path
) -> tuple[str, dict[str, np.ndarray]]:
    """(MKL's mode, every layer's output) from a new process: MKL reads its mode once per
    process, at its first call."""
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    if mkl_cbwr is not None:
        env["MKL_CBWR"] = mkl_cbwr
    done = subprocess.run(
        [sys.executable, "-c", _EVERY_LAYER, str(threads), str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    with np.load(path) as saved:
        return done.stdout.strip().splitlines()[-1], {name: saved[name] for name in saved.files}


def test_strict_mkl_is_the_default_and_keeps_the_feature_layers_bytes(tmp_path: Path) -> None:
    """Strict mode gives two threads the single-threaded bytes, and those are the bytes of
    MKL's own default for every feature layer (so no embedding cached or recorded before it
    moves). The classifier GEMM takes another path: `logits` moved by rounding, |d| 1.4e-6 at
    magnitudes up to 11.4 (about one ulp), Intel Xeon. An explicit MKL_CBWR is the operator's
    and is left alone ("" here: MKL's own default)."""
    mode_one, one = _every_layer_in_a_fresh_process(1, None, tmp_path / "one.npz")
    mode_two, two = _every_layer_in_a_fresh_process(2, None, tmp_path / "two.npz")
    mode_default, default = _every_layer_in_a_fresh_process(1, "", tmp_path / "default.npz")
    assert mode_one == mode_two == "AUTO,STRICT"
    assert mode_default == "OFF"
    assert one.keys() == two.keys() == default.keys()
    for name in one:
        assert one[name].tobytes() == two[name].tobytes(), name
        if name != "logits":
            assert one[name].tobytes() == default[name].tobytes(), name
    scale = float(np.abs(default["logits"]).max())
    assert np.abs(one["logits"] - default["logits"]).max() <= 1e-6 * scale


def _wide_batches() -> float:
    return METRICS.sample("embedwarden_wide_batches_total", {"model": MODEL, "version": "1"}) or 0


def test_lone_requests_run_wide_and_match_a_server_that_never_widens(
    server: ServerThread, client: Client, photos: dict[str, bytes], tmp_path
) -> None:
    settings = server.app.settings
    if settings.inference_lanes < 2:
        pytest.skip("one inference lane: nothing to widen on this machine")
    before = _wide_batches()
    served = [client.extract([photos[n]], MODEL, cache="off").array for n in photos]
    identical = server.app.models.get(MODEL).passes.identical_shapes()
    lone = [same for (shape, _), same in identical.items() if shape[0] == 1]
    assert lone  # the first lone batch of a shape was compared
    if all(lone):  # the first of a shape compares, the rest run wide
        assert _wide_batches() >= before + len(photos) - 1
    elif not any(lone):  # this CPU's kernels split by thread at that shape: it stays narrow
        assert _wide_batches() == before

    with (
        ServerThread(make_settings(tmp_path / "narrow", wide_idle_passes=False)) as narrow,
        Client(narrow.address, timeout=120) as other,
    ):
        expected = [other.extract([photos[n]], MODEL, cache="off").array for n in photos]
        assert not narrow.app.models.get(MODEL).passes.identical_shapes()  # never widened
    for name, got, want in zip(photos, served, expected, strict=True):
        assert got.tobytes() == want.tobytes(), name


def test_a_forked_child_runs_multithreaded_passes_on_a_team_thread_of_its_own() -> None:
    """After a fork the parent's team thread is gone; a pass in the child must not wait on it."""
    import multiprocessing

    from embedwarden.server._frameworks import run_torch_pass

    run_torch_pass(lambda: None, pass_threads() + 1)  # the parent's team thread exists now
    child = multiprocessing.get_context("fork").Process(
        target=run_torch_pass, args=(lambda: None, pass_threads() + 1)
    )
    child.start()
    child.join(30)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung and child.exitcode == 0
