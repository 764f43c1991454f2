"""Fuzz: random damage to a random file of a small checkpoint never escapes as anything but a
statevault error, and never loads as anything but the exact original state.

Each example copies a pristine checkpoint, mutates one file (the manifest or a shard) by
flipping bits, overwriting, truncating or inserting bytes, then loads and verifies it. Either
the load raises a CheckpointError (and verify reports a problem), or the mutation changed
nothing that matters (whitespace after the manifest, a byte overwritten with itself) and the
load returns exactly what was saved (and verify agrees).
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import statevault as sv
from tests.hostile_helpers import assert_same, make_state, save_small

_counter = itertools.count()


@pytest.fixture
def pristine(tmp_path: Path) -> Path:
    return save_small(tmp_path / "pristine")


def _mutation() -> st.SearchStrategy[tuple[str, Any]]:
    position = st.floats(0.0, 1.0, exclude_max=True)
    return st.one_of(
        st.tuples(st.just("flip"), st.lists(st.tuples(position, st.integers(0, 7)), min_size=1)),
        st.tuples(st.just("overwrite"), st.tuples(position, st.binary(min_size=1, max_size=16))),
        st.tuples(st.just("truncate"), position),
        st.tuples(st.just("insert"), st.tuples(position, st.binary(min_size=1, max_size=16))),
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=16)),
    )


def _mutate(data: bytes, kind: str, arg: Any) -> bytes:
    buf = bytearray(data)
    if kind == "flip":
        for where, bit in arg:
            buf[int(where * len(buf))] ^= 1 << bit
    elif kind == "overwrite":
        where, chunk = arg
        start = int(where * len(buf))
        buf[start : start + len(chunk)] = chunk[: len(buf) - start]
    elif kind == "truncate":
        del buf[int(arg * len(buf)) :]
    elif kind == "insert":
        where, chunk = arg
        start = int(where * len(buf))
        buf[start:start] = chunk
    else:
        buf += arg
    return bytes(buf)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    target=st.sampled_from(["manifest.json", "shard"]),
    mutation=_mutation(),
    verify_on_load=st.booleans(),
)
def test_random_damage_is_refused_or_harmless(
    pristine: Path, target: str, mutation: tuple[str, Any], verify_on_load: bool
) -> None:
    ck = pristine.parent / f"fuzz-{next(_counter)}"
    shutil.copytree(pristine, ck)
    name = target if target == "manifest.json" else next(ck.glob("*.safetensors")).name
    original = (ck / name).read_bytes()
    mutated = _mutate(original, *mutation)
    (ck / name).write_bytes(mutated)

    loaded: Any = None
    try:
        loaded = sv.load(ck, verify=verify_on_load)
    except sv.CheckpointError:
        loaded_ok = False
    else:
        loaded_ok = True
        if verify_on_load:  # a verified load returns the original state or nothing
            assert_same(loaded, make_state())

    report = sv.verify(ck)  # reports; raises nothing for a directory that has a manifest
    if report.ok:  # whatever verify passes loads, exactly as saved, with or without checksums
        assert loaded_ok, mutation
        assert_same(loaded, make_state())
        # ... and was no change at all: every shard byte is covered by a checksum, and so is
        # every manifest byte but the whitespace around the body.
        if target == "shard":
            assert mutated == original, mutation
        else:
            assert json.loads(mutated) == json.loads(original), mutation
    elif verify_on_load:  # and whatever it refuses, a verified load refuses too
        assert not loaded_ok, (report.problems, mutation)
    if mutated == original:
        assert report.ok
    shutil.rmtree(ck)
