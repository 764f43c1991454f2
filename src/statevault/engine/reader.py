"""Read: check the files against the manifest, then ranged reads into fresh buffers, verified.

Before a single tensor byte is allocated, every file's size is compared with the manifest, so a
hostile manifest cannot make a load allocate more than the files hold. Reads are positional
(``pread``) into the destination buffers, in parallel threads, each chunk checksummed right after
it lands. Problems are collected, not raised one by one, so that a report names all of them.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from statevault.format.checksum import crc32c_of, parse_checksum
from statevault.format.manifest import Manifest, TensorEntry
from statevault.storage.local import open_read, read_into_fd

CHUNK_BYTES = 16 << 20
READ_THREADS = 8

# Given a tensor row, returns (array object, writable memoryview of its bytes).
Allocator = Callable[[TensorEntry], "tuple[object, memoryview]"]


@dataclass
class ReadOutcome:
    arrays: dict[int, object] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    bytes_read: int = 0


def _file_kind(mode: int) -> str | None:
    """None for a regular file, else what it is instead."""
    if stat.S_ISREG(mode):
        return None
    return (
        "symlink" if stat.S_ISLNK(mode) else "directory" if stat.S_ISDIR(mode) else "special file"
    )


class CheckpointReader:
    """Reads one local checkpoint directory whose manifest has been parsed and validated."""

    def __init__(self, directory: str, manifest: Manifest) -> None:
        self.directory = directory
        self.manifest = manifest

    def file_problems(self, check_headers: bool) -> list[str]:
        """Missing or resized files, and (optionally) damaged safetensors headers."""
        problems: list[str] = []
        for entry in self.manifest.files:
            path = os.path.join(self.directory, entry.name)
            try:
                # lstat first: opening a FIFO would block, a symlink may lead outside.
                kind = _file_kind(os.lstat(path).st_mode)
                if kind is not None:
                    problems.append(f"file {entry.name}: is a {kind}, not a regular file")
                    continue
                fd = open_read(path)
            except OSError as exc:
                problems.append(f"file {entry.name}: cannot be opened ({exc.strerror})")
                continue
            try:
                st = os.fstat(fd)
                size = st.st_size
                if not stat.S_ISREG(st.st_mode):
                    problems.append(f"file {entry.name}: is not a regular file")
                elif size != entry.size:
                    problems.append(
                        f"file {entry.name}: {size} bytes on disk, {entry.size} in the manifest"
                        + (" (truncated)" if size < entry.size else "")
                    )
                elif check_headers:
                    header = bytearray(entry.header_size)
                    read_into_fd(fd, 0, memoryview(header))
                    if crc32c_of(header) != parse_checksum(entry.header_checksum):
                        problems.append(f"file {entry.name}: safetensors header checksum mismatch")
                    elif 8 + int.from_bytes(header[:8], "little") != entry.header_size:
                        problems.append(
                            f"file {entry.name}: safetensors header length "
                            f"{int.from_bytes(header[:8], 'little')} disagrees with the manifest"
                        )
            except (OSError, EOFError) as exc:
                problems.append(f"file {entry.name}: cannot be read ({exc})")
            finally:
                os.close(fd)
        return problems

    def read(self, ids: Sequence[int], allocate: Allocator, verify: bool) -> ReadOutcome:
        """Read the tensors ``ids`` into buffers from ``allocate``, verifying checksums."""
        outcome = ReadOutcome()
        by_file: dict[str, list[int]] = {}
        for index in ids:
            by_file.setdefault(self.manifest.tensors[index].file, []).append(index)
        descriptors = {name: open_read(os.path.join(self.directory, name)) for name in by_file}
        try:
            jobs = [(index, descriptors[self.manifest.tensors[index].file]) for index in ids]
            threads = max(1, min(READ_THREADS, len(jobs)))
            with ThreadPoolExecutor(threads, thread_name_prefix="statevault-read") as pool:
                results = list(
                    pool.map(lambda job: self._read_one(job[0], job[1], allocate, verify), jobs)
                )
        finally:
            for fd in descriptors.values():
                os.close(fd)
        for index, array, problem in results:
            outcome.arrays[index] = array
            outcome.bytes_read += self.manifest.tensors[index].nbytes
            if problem is not None:
                outcome.problems.append(problem)
        return outcome

    def _read_one(
        self, index: int, fd: int, allocate: Allocator, verify: bool
    ) -> tuple[int, object, str | None]:
        entry = self.manifest.tensors[index]
        array, view = allocate(entry)
        view = view.cast("B") if view.format != "B" else view
        checksum = 0
        try:
            for start in range(0, entry.nbytes, CHUNK_BYTES):
                chunk = view[start : start + CHUNK_BYTES]
                read_into_fd(fd, entry.offset + start, chunk)
                if verify:
                    checksum = crc32c_of(chunk, checksum)
        except (EOFError, OSError) as exc:
            return index, array, f"tensor {entry.path} in {entry.file}: read failed ({exc})"
        if verify and checksum != parse_checksum(entry.checksum):
            return index, array, f"tensor {entry.path} in {entry.file}: checksum mismatch"
        return index, array, None
