"""Names that may appear inside a checkpoint directory.

A file name read from a manifest is hostile until checked: it must be a plain name (no separator,
no ``..``, not absolute, no control characters), so that it can never leave the directory.
"""

from __future__ import annotations

import re

MANIFEST_NAME = "manifest.json"
_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def shard_name(index: int, rank: int = 0, tag: str = "") -> str:
    """``data-r<rank>-<index><tag>.safetensors``; the tag makes names unique to one save on
    object stores, where a save cannot be written aside and renamed."""
    return f"data-r{rank:05d}-{index:05d}{tag}.safetensors"


def part_name(rank: int, tag: str = "") -> str:
    """``part-r<rank><tag>.json``: a rank's report in a distributed save, deleted before the
    manifest is written (checkpoint/parts.py)."""
    return f"part-r{rank:05d}{tag}.json"


SAVE_MARKER = ".statevault-save"


def marker_name(tag: str = "") -> str:
    """``.statevault-save<tag>``: the first file a save writes, before any shard, and the last
    one a deletion removes. Whatever directory or prefix holds it was written by statevault
    (docs/FORMAT.md section 1.2), so that statevault deletes only what is provably its own."""
    return f"{SAVE_MARKER}{tag}"


_WRITTEN_SHARD = re.compile(
    r"^(data-r\d{5}-\d{5}(-[0-9a-f]{8})?\.safetensors|(part|index)-r\d{5}(-[0-9a-f]{8})?\.json"
    r"|indexes(-[0-9a-f]{8})?\.tbl|\.statevault-save(-[0-9a-f]{8})?)$"
)
_MARKER = re.compile(r"^\.statevault-save(-[0-9a-f]{8})?$")
_PART = re.compile(r"^part-r(\d{5})(-[0-9a-f]{8})?\.json$")


def is_shard_name(name: str) -> bool:
    """Whether ``name`` is an object a save writes: a shard (see :func:`shard_name`), a part,
    a rank's index and the index table (format/indexed.py), or the save's marker."""
    return _WRITTEN_SHARD.fullmatch(name) is not None


def is_marker_name(name: str) -> bool:
    return _MARKER.fullmatch(name) is not None


def part_rank(name: str, tag: str = "") -> int | None:
    """The rank of a part object of the save tagged ``tag``, else None."""
    match = _PART.fullmatch(name)
    if match is None or (match.group(2) or "") != tag:
        return None
    return int(match.group(1))


def is_safe_file_name(name: object) -> bool:
    """True for a plain file name that cannot escape the checkpoint directory."""
    return (
        isinstance(name, str)
        and _SHARD_NAME.fullmatch(name) is not None
        and ".." not in name
        and name != MANIFEST_NAME
    )
