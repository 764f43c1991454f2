"""Helpers for the CheckpointManager tests: small states, what a run directory holds on disk,
byte surgery on one checkpoint (flip a payload bit, truncate a shard, damage the manifest) and a
child process whose stdout lines can be awaited with a deadline (lock and preemption tests).
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

import statevault as sv
from statevault.format.names import MANIFEST_NAME
from statevault.manager.naming import parse_step, step_dir_name

SRC = Path(__file__).resolve().parents[1] / "src"

# ---- states and runs --------------------------------------------------------------------------


def small_state(step: int) -> dict[str, Any]:
    """A state whose every byte is a function of ``step`` (~4 KiB of payload, plain values)."""
    return {
        "w": np.arange(1024, dtype=np.float32) + np.float32(step),
        "step": step,
        "tag": f"step-{step}",
    }


def saved_step_of(path: str | Path) -> int:
    """The step a checkpoint written with :func:`small_state` holds (loads and verifies it)."""
    state = sv.load(path)
    assert np.array_equal(state["w"], small_state(state["step"])["w"])
    return int(state["step"])


def save_steps(
    mgr: sv.CheckpointManager,
    steps: Iterable[int],
    metrics: Mapping[int, Mapping[str, Any]] | None = None,
) -> None:
    """Save each step through the manager (no cadence set: every step is due)."""
    for step in steps:
        saved = mgr.save(step, small_state(step), metrics=(metrics or {}).get(step))
        assert saved, f"step {step} was not saved"


def step_dir(run: Path, step: int) -> Path:
    return run / step_dir_name(step)


def dirs_on_disk(run: Path) -> list[int]:
    """Steps that have a ``step_N`` directory on disk, whatever it holds."""
    steps = (parse_step(name) for name in os.listdir(run) if (run / name).is_dir())
    return sorted(s for s in steps if s is not None)


def committed_on_disk(run: Path) -> list[int]:
    """Steps whose ``step_N`` directory holds a manifest (what a fresh reader would list)."""
    return [s for s in dirs_on_disk(run) if (step_dir(run, s) / MANIFEST_NAME).is_file()]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` and its bytes (to prove that nothing was touched)."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# ---- damage -----------------------------------------------------------------------------------


def shards(ck: Path) -> list[Path]:
    found = sorted(ck.glob("*.safetensors"))
    assert found, f"no shard in {ck}"
    return found


def flip_payload_bit(ck: Path) -> Path:
    """Flip one bit in the tensor bytes (after the safetensors header) of the largest shard."""
    shard = max(shards(ck), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    header = int.from_bytes(data[:8], "little")
    start = 8 + header
    assert start < len(data), "shard without tensor bytes"
    data[start + (len(data) - start) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    return shard


def truncate_shard(ck: Path) -> Path:
    shard = max(shards(ck), key=lambda p: p.stat().st_size)
    size = shard.stat().st_size
    os.truncate(shard, size - 7)
    return shard


def damage_manifest(ck: Path) -> Path:
    """Flip one bit in the middle of manifest.json (inside the checksummed body)."""
    manifest = ck / MANIFEST_NAME
    data = bytearray(manifest.read_bytes())
    data[len(data) // 2] ^= 0x01
    manifest.write_bytes(bytes(data))
    return manifest


DAMAGE = {
    "payload-bit": flip_payload_bit,
    "truncated-shard": truncate_shard,
    "manifest": damage_manifest,
}


# ---- child processes --------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Child:
    """A python child process; ``expect`` waits (with a deadline) for a line with a prefix."""

    def __init__(self, script: Path, *args: str, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=child_env(),
        )
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        self._buffer = b""
        self.lines: list[str] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect(self, prefix: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\n", 1)
                line = raw.decode()
                self.lines.append(line)
                if line.startswith(prefix):
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line {prefix!r} in time; got {self.lines}")
            ready, _, _ = select.select([self._fd], [], [], left)
            if ready:
                chunk = os.read(self._fd, 65536)
                if not chunk:
                    self.proc.wait(timeout=10)
                    raise AssertionError(
                        f"child exited ({self.proc.returncode}) before {prefix!r}; "
                        f"stdout {self.lines}; stderr {self.stderr()}"
                    )
                self._buffer += chunk

    def finish(self, timeout: float = 30.0) -> tuple[int, list[str]]:
        """Wait for the exit; returns the exit code and every stdout line."""
        out, _ = self.proc.communicate(timeout=timeout)
        rest = (self._buffer + out).decode().splitlines()
        self._buffer = b""
        self.lines.extend(rest)
        return self.proc.returncode, self.lines

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
