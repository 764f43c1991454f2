"""The benchmark state, tree helpers, and one small adapter class per checkpointer.

Adapters all have the same methods:

    setup(state)              untimed: build managers, prewarm what the library offers to prewarm
    save(state, path)         timed: returns SaveTiming (total; stall for an asynchronous save)
    load_target(state)        untimed: what ``load`` loads into, when the library needs one
    load(path, target)        timed: returns the loaded tree (the caller touches every tensor)
    close()                   untimed

Every save gets a fresh, not yet existing directory ``path``. A save is timed until its bytes are
durable: ``fsync`` is part of every save row (a library that does not fsync gets its files
fsynced by the benchmark, inside the timing, and its note says so).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

BENCH_EXTRA = "pip install -e '.[bench]'"


@dataclass
class SaveTiming:
    total: float
    stall: float | None = None
    written: str | None = None  # where the save went, when not the ``path`` it was given


# ---- trees -----------------------------------------------------------------------------------


def flatten(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Key path ("a/b/c") -> tensor, for every tensor leaf of nested mappings."""
    flat: dict[str, torch.Tensor] = {}
    if isinstance(tree, torch.Tensor):
        flat[prefix] = tree
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}/{key}" if prefix else str(key)))
    elif isinstance(tree, list | tuple):
        for index, value in enumerate(tree):
            flat.update(flatten(value, f"{prefix}/{index}" if prefix else str(index)))
    return flat


def tensors_of(tree: Any) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, Mapping):
        for value in tree.values():
            yield from tensors_of(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield from tensors_of(value)


def empty_like_tree(tree: Any) -> Any:
    """Zero-filled tensors of the same shapes, dtypes and devices (pages faulted in)."""
    if isinstance(tree, torch.Tensor):
        return torch.zeros_like(tree)
    if isinstance(tree, Mapping):
        return {key: empty_like_tree(value) for key, value in tree.items()}
    return tree


def fsync_tree(path: str) -> None:
    """fsync every file under ``path`` and every directory (for libraries that do not)."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Peer:
    """Defaults for the optional methods."""

    name = ""
    note = ""
    asynchronous = False

    def setup(self, state: Any) -> None:
        return None

    def save(self, state: Any, path: str) -> SaveTiming:
        raise NotImplementedError

    def load_target(self, state: Any) -> Any:
        return None

    def load(self, path: str, target: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        return None


# ---- the state -------------------------------------------------------------------------------


def build_state(size_bytes: int, device: str, seed: int = 0) -> dict[str, Any]:
    """A transformer-like model state plus AdamW moments, about ``size_bytes`` in all."""
    shapes = _model_shapes(size_bytes // 3)
    generator = torch.Generator(device=device).manual_seed(seed)
    model: dict[str, torch.Tensor] = {}
    for name, (shape, dtype) in shapes.items():
        model[name] = torch.randn(shape, generator=generator, device=device).to(dtype)
    optimizer: dict[str, Any] = {}
    for name, tensor in model.items():
        optimizer[name] = {
            "step": torch.tensor(1000.0, device=device),
            "exp_avg": torch.randn(tensor.shape, generator=generator, device=device).to(
                tensor.dtype
            )
            * 1e-3,
            "exp_avg_sq": torch.rand(tensor.shape, generator=generator, device=device).to(
                tensor.dtype
            )
            * 1e-6,
        }
    return {"model": model, "optimizer": optimizer}


def _model_shapes(weight_bytes: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Layers of attention + MLP (fp32) and embeddings, sized to ``weight_bytes``.

    ~85% of the bytes in ~12 layers; fp32 token embeddings; a bf16 lm_head and final norm.
    """
    f32, bf16 = torch.float32, torch.bfloat16
    d = max(64, int(math.sqrt(0.85 * weight_bytes / (12 * 12 * 4))) // 64 * 64)
    layer_bytes = 4 * (12 * d * d + 13 * d)
    layers = max(1, round(0.85 * weight_bytes / layer_bytes))
    vocab = max(64, (weight_bytes - layers * layer_bytes) // (6 * d) // 64 * 64)
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "embed_tokens.weight": ((vocab, d), f32)
    }
    for i in range(layers):
        p = f"layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}attn.{proj}.weight"] = ((d, d), f32)
            shapes[f"{p}attn.{proj}.bias"] = ((d,), f32)
        shapes[f"{p}mlp.up_proj.weight"] = ((4 * d, d), f32)
        shapes[f"{p}mlp.up_proj.bias"] = ((4 * d,), f32)
        shapes[f"{p}mlp.down_proj.weight"] = ((d, 4 * d), f32)
        shapes[f"{p}mlp.down_proj.bias"] = ((d,), f32)
        for norm in ("input_norm", "post_attn_norm"):
            shapes[f"{p}{norm}.weight"] = ((d,), f32)
            shapes[f"{p}{norm}.bias"] = ((d,), f32)
    shapes["norm.weight"] = ((d,), bf16)
    shapes["norm.bias"] = ((d,), bf16)
    shapes["lm_head.weight"] = ((vocab, d), bf16)
    return shapes


def nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def touch(tree: Any, mode: str) -> None:
    """Make a loaded tree really usable, inside the timing, so that lazy mmap is not free.

    "sum": one pass over every byte of every CPU tensor (a single-threaded numpy sum of its raw
    bytes: what a consumer reading the tensor once pays; independent of torch's threads);
    "page": one element per 4 KiB page (every page made resident, nothing more). Device
    tensors are materialized already: the touch is one synchronize.
    """
    cuda = False
    for tensor in tensors_of(tree):
        if tensor.device.type == "cuda":
            cuda = True
            continue
        if tensor.numel() == 0:
            continue
        raw = tensor.detach().reshape(-1).view(torch.uint8).numpy()
        if mode == "page":
            raw[::4096].sum()
        elif raw.size % 8 == 0:
            raw.view(np.uint64).sum()
        else:
            raw.sum()
    if cuda:
        torch.cuda.synchronize()


def equal_trees(expected: dict[str, torch.Tensor], loaded: Any) -> str | None:
    """None when ``loaded`` holds exactly ``expected`` (key paths, dtypes, bytes)."""
    flat = loaded if _is_flat(loaded) else flatten(loaded)
    if set(flat) != set(expected):
        missing = sorted(set(expected) - set(flat))[:3]
        extra = sorted(set(flat) - set(expected))[:3]
        return f"keys differ (missing {missing}, unexpected {extra})"
    for key, want in expected.items():
        got = flat[key]
        if got.dtype != want.dtype or got.shape != want.shape:
            return f"{key}: {got.dtype} {list(got.shape)} != {want.dtype} {list(want.shape)}"
        if not torch.equal(got.to(want.device), want):
            return f"{key}: values differ"
    return None


def _is_flat(tree: Any) -> bool:
    return isinstance(tree, dict) and all(isinstance(v, torch.Tensor) for v in tree.values())


# ---- torch.save ------------------------------------------------------------------------------


class TorchSave(Peer):
    name = "torch.save"
    note = "one pickle+zip file, + fsync"
    load_note = "weights_only=True"

    def __init__(self, device: str) -> None:
        self.device = device

    def save(self, state: Any, path: str) -> SaveTiming:
        started = time.perf_counter()
        os.makedirs(path)
        with open(os.path.join(path, "state.pt"), "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        return SaveTiming(time.perf_counter() - started)

    def load(self, path: str, target: Any) -> Any:
        return torch.load(
            os.path.join(path, "state.pt"), weights_only=True, map_location=self.device
        )


# ---- safetensors -----------------------------------------------------------------------------


class Safetensors(Peer):
    name = "safetensors save_file"
    note = "flattened dict, one file, + fsync"
    load_note = "load_file"

    def __init__(self, device: str) -> None:
        self.device = device

    def save(self, state: Any, path: str) -> SaveTiming:
        from safetensors.torch import save_file

        started = time.perf_counter()
        os.makedirs(path)
        file = os.path.join(path, "state.safetensors")
        save_file(flatten(state), file)
        _fsync_file(file)
        return SaveTiming(time.perf_counter() - started)

    def load(self, path: str, target: Any) -> Any:
        from safetensors.torch import load_file

        return load_file(os.path.join(path, "state.safetensors"), device=self.device)


# ---- torch.distributed.checkpoint ------------------------------------------------------------


def _dcp_single_process() -> bool:
    """True when no process group is up: DCP is then told it runs alone (no_dist)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


class DCP(Peer):
    name = "DCP save"
    note = "FileSystemWriter defaults (fsyncs its files)"
    load_note = "into preallocated tensors"

    def __init__(self, device: str) -> None:
        self.device = device

    def save(self, state: Any, path: str) -> SaveTiming:
        import torch.distributed.checkpoint as dcp

        started = time.perf_counter()
        dcp.save(
            state,
            storage_writer=dcp.FileSystemWriter(path),
            no_dist=_dcp_single_process(),
        )
        return SaveTiming(time.perf_counter() - started)

    def load_target(self, state: Any) -> Any:
        return empty_like_tree(state)

    def load(self, path: str, target: Any) -> Any:
        import torch.distributed.checkpoint as dcp

        dcp.load(target, storage_reader=dcp.FileSystemReader(path), no_dist=_dcp_single_process())
        return target


class DCPAsync(Peer):
    name = "DCP async_save"
    note = "default stager; stall = until the call returns"
    asynchronous = True

    def save(self, state: Any, path: str) -> SaveTiming:
        import torch.distributed.checkpoint as dcp

        started = time.perf_counter()
        result = dcp.async_save(
            state,
            storage_writer=dcp.FileSystemWriter(path),
            no_dist=_dcp_single_process(),
        )
        staging = getattr(result, "staging_completion", None)
        if staging is not None:  # newer DCP: training waits for staging, then may go on
            staging.result()
        stall = time.perf_counter() - started
        upload = getattr(result, "upload_completion", result)
        upload.result()
        return SaveTiming(time.perf_counter() - started, stall)


# ---- torch-checkpointing 0.1.1 ---------------------------------------------------------------

TC_DIRECT_IO_OFF = "O_DIRECT off (LocalFileSystemStorageConfig(use_direct_io=False))"
TC_DIRECT_IO_ON = "its default O_DIRECT writer (it works on this filesystem)"
TC_FSYNC_NOTE = "it does not fsync: the benchmark fsyncs its files (timed)"


def torch_checkpointing_missing() -> str | None:
    """None when torch-checkpointing imports, else what to do about it."""
    try:
        import torch_checkpointing  # noqa: F401
    except ImportError as exc:
        return f"torch-checkpointing not installed ({exc}); install it: {BENCH_EXTRA}"
    return None


def _tc_manager(asynchronous: bool, direct_io: bool) -> Any:
    from torch_checkpointing import CheckpointManager
    from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig

    config = (
        CheckpointManager.Config.with_async_save()
        if asynchronous
        else CheckpointManager.Config.with_sync_save()
    )
    config.storage_config = LocalFileSystemStorageConfig(use_direct_io=direct_io)
    return config.build()


def probe_torch_checkpointing_direct_io(directory: str) -> str:
    """Try torch-checkpointing's default writer (O_DIRECT on) on a tiny state, here.

    Returns "works" or the exact error it raised.
    """
    quiet = logging.getLogger("torch_checkpointing")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        manager = _tc_manager(asynchronous=False, direct_io=True)
        try:
            manager.save(os.path.join(directory, "probe"), {"x": {"w": torch.ones(1000)}})
        finally:
            manager.close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        quiet.setLevel(level)
    return "works"


class TorchCheckpointing(Peer):
    """torch-checkpointing's CheckpointManager, sync or async, with O_DIRECT off."""

    load_note = "CheckpointManager.load (mmap)"

    def __init__(self, device: str, asynchronous: bool, direct_io: bool = False) -> None:
        self.device = device
        self.asynchronous = asynchronous
        self.direct_io = direct_io
        self.name = "torch-checkpointing " + ("async" if asynchronous else "sync")
        stall = "; stall = save() + staging done (`with manager.lock()`)" if asynchronous else ""
        mode = TC_DIRECT_IO_ON if direct_io else TC_DIRECT_IO_OFF
        self.note = f"{mode}; {TC_FSYNC_NOTE}{stall}"
        self.manager: Any = None

    def setup(self, state: Any) -> None:
        self.manager = _tc_manager(self.asynchronous, direct_io=self.direct_io)
        if self.asynchronous:
            self.manager.prewarm_staging(state)  # its own way to allocate staging early

    def save(self, state: Any, path: str) -> SaveTiming:
        started = time.perf_counter()
        future = self.manager.save(path, state)
        stall = None
        if self.asynchronous:
            with self.manager.lock():  # what training waits on before it mutates the state
                stall = time.perf_counter() - started
            if future is not None:
                future.result()
        fsync_tree(path)
        return SaveTiming(time.perf_counter() - started, stall)

    def load_target(self, state: Any) -> Any:
        return dict.fromkeys(state)  # item keys only: it reads each item as saved

    def load(self, path: str, target: Any) -> Any:
        if self.manager is None:
            self.manager = _tc_manager(asynchronous=False, direct_io=self.direct_io)
        return self.manager.load(path, into=target, map_location=self.device)

    def close(self) -> None:
        if self.manager is not None:
            manager, self.manager = self.manager, None
            manager.close()


# ---- statevault ------------------------------------------------------------------------------


class StatevaultSync(Peer):
    name = "statevault sync (sv.save)"
    note = "CRC32C checksums, atomic commit, fsync"

    def __init__(self, device: str, verify: bool = True, note: str = "") -> None:
        self.device = device
        self.verify = verify
        self.load_note = note

    def save(self, state: Any, path: str) -> SaveTiming:
        import statevault as sv

        started = time.perf_counter()
        sv.save(state, path)
        return SaveTiming(time.perf_counter() - started)

    def load(self, path: str, target: Any) -> Any:
        import statevault as sv

        device = None if self.device == "cpu" else self.device
        return sv.load(path, device=device, verify=self.verify)


class StatevaultBuffered(StatevaultSync):
    """statevault's sync save with O_DIRECT turned off: the buffered path, for comparison."""

    name = "statevault sync, O_DIRECT off"
    note = "STATEVAULT_DIRECT_IO=0: buffered writes through the page cache (comparison)"

    def save(self, state: Any, path: str) -> SaveTiming:
        previous = os.environ.get("STATEVAULT_DIRECT_IO")
        os.environ["STATEVAULT_DIRECT_IO"] = "0"
        try:
            return super().save(state, path)
        finally:
            if previous is None:
                del os.environ["STATEVAULT_DIRECT_IO"]
            else:
                os.environ["STATEVAULT_DIRECT_IO"] = previous


class StatevaultInto(Peer):
    """Restore into an existing state: a zero-filled twin of it, so that the check means it."""

    name = "statevault sv.load(into=state)"
    load_note = "into existing tensors"

    def load_target(self, state: Any) -> Any:
        return empty_like_tree(state)

    def load(self, path: str, target: Any) -> Any:
        import statevault as sv

        sv.load(path, into=target)
        return target


class StatevaultAsync(Peer):
    """CheckpointManager(async_save=True); restore(into=state) once first (it prewarms)."""

    name = "statevault async (CheckpointManager)"
    note = "restore(into=state) before the first save prewarms staging"
    asynchronous = True

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.manager: Any = None
        self.arena: Any = None
        self.step = 0
        self._waiter: _Waiter | None = None

    def setup(self, state: Any) -> None:
        import statevault as sv

        self.manager = sv.CheckpointManager(
            self.run_dir, async_save=True, max_to_keep=None, save_on_preemption=False
        )
        started = time.perf_counter()
        self.manager.restore(into=state)
        # Diagnostic only (private attributes, read not changed): how long the background
        # prewarm that restore() started runs, and how much staging memory it makes ready.
        self.arena = getattr(getattr(self.manager, "_saver", None), "arena", None)
        thread = getattr(self.arena, "_warming", None)
        self._waiter = _Waiter(thread, started) if thread is not None else None

    def save(self, state: Any, path: str) -> SaveTiming:
        self.step += 1
        started = time.perf_counter()
        self.manager.save(self.step, state, force=True)
        stall = time.perf_counter() - started
        self.manager.wait()
        total = time.perf_counter() - started
        return SaveTiming(total, stall, written=self.manager.path(self.step))

    def prewarm_seconds(self) -> float | None:
        """Seconds from restore() until the staging memory was ready (None: not measured)."""
        if self._waiter is None:
            return None
        self._waiter.join()
        return self._waiter.seconds

    def staging_bytes(self) -> int | None:
        capacity = getattr(self.arena, "capacity", None)
        return int(capacity) if capacity is not None else None

    def close(self) -> None:
        if self.manager is not None:
            manager, self.manager = self.manager, None
            manager.close()


class _Waiter:
    """Notes when a thread ends (the manager's prewarm), without touching it otherwise."""

    def __init__(self, thread: threading.Thread, started: float) -> None:
        self.seconds: float | None = None
        self._target = thread
        self._started = started
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        self._target.join()
        self.seconds = time.perf_counter() - self._started


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """DCP and friends warn about single-process use on every call; keep the table readable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
