"""Fetching a remote checkpoint into staging: whole, or only the tensors the model reads.

Real checkpoints (a Keras model trained with Adam, written by
``tf.train.CheckpointManager``: :mod:`remote_checkpoints`) are uploaded to
moto's S3 and fake-gcs-server. A ranged fetch must download well under half
of the bytes (the optimizer's slots stay behind) and TensorFlow must restore
the model from the sparse staged files with the trained values. The
standard-library index decoder it relies on is checked against
TensorFlow's own parse of every index (a fast test: TensorFlow runs once, in
the subprocess that writes the checkpoints).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from remote_checkpoints import restored_digests, write_checkpoints
from test_sources_remote import CountingStore, upload

from daemon.formats import bundle
from daemon.objectstore.client import ObjectStore, ObjectStoreError
from daemon.objectstore.url import ObjectURL
from daemon.sources.base import Checkpoint
from daemon.sources.tf1_checkpoint import TF1CheckpointSource
from daemon.sources.tf_checkpoint import TFCheckpointSource
from daemon.supervisor import staging
from daemon.supervisor.staging import CheckpointVanished, fetch_checkpoint, plan_ranges


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoints(tmp_path_factory.mktemp("written"))


def _entry(shard: int, offset: int, size: int) -> bundle.Entry:
    return bundle.Entry(1, (size // 4,), shard, offset, size, 0, False)


# -- the index decoder, without TensorFlow -----------------------------------------


def test_the_stdlib_index_decoder_agrees_with_tensorflows_protos(written: Path) -> None:
    """Every entry of every index (Adam slots, strings, int64, shards, slices) decodes alike."""
    dump: dict[str, dict[str, Any]] = json.loads((written / "tf_index.json").read_text())
    assert {"adam/ckpt-3.index", "mixed/ckpt.index"} <= set(dump)
    for name, expected in dump.items():
        prefix = str(written / name.removesuffix(".index"))
        b = bundle.read_index(prefix)
        assert b == bundle.parse_index((written / name).read_bytes(), prefix)
        got: dict[str, Any] = {
            key: [e.dtype, list(e.shape), e.shard_id, e.offset, e.size, e.crc32c, e.sliced]
            for key, e in b.entries.items()
        }
        got[""] = b.num_shards
        assert got == expected, name
    if "sharded/ckpt-3.index" in dump:  # this TensorFlow can split a checkpoint into shards
        sharded = bundle.read_index(str(written / "sharded" / "ckpt-3"))
        assert sharded.num_shards > 1 and any(e.sliced for e in sharded.entries.values())


def test_a_damaged_index_is_refused_by_the_decoder(written: Path) -> None:
    data = (written / "adam" / "ckpt-3.index").read_bytes()
    with pytest.raises(bundle.BundleFormatError, match="not a complete table"):
        bundle.parse_index(data[:-1], "x")
    with pytest.raises(bundle.BundleFormatError):
        bundle.parse_index(data[:10] + data[-48:], "x")
    # An entry whose protobuf is cut short.
    with pytest.raises(bundle.BundleFormatError):
        bundle._entry(b"\x08\x01\x12\x05\x12")


@pytest.mark.parametrize("fast", [True, False], ids=["google_crc32c", "pure_python"])
def test_each_stored_tensor_checks_against_its_index_crc(
    written: Path, monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    """Numbers, strings (their lengths checksummed as uint32), bools, halves, empty tensors."""
    if not fast:
        monkeypatch.setattr(staging, "_FAST_CRC32C", None)
    elif staging._FAST_CRC32C is None:
        pytest.skip("google_crc32c (C) is not installed")
    checked = 0
    for prefix in (written / "mixed" / "ckpt", written / "adam" / "ckpt-3"):
        b = bundle.read_index(str(prefix))
        for key, e in b.entries.items():
            crc = staging._masked_crc32c(e, b.read(key))
            if crc is None:  # too big for the pure-Python CRC: size only
                assert not fast and e.size > staging.PURE_PYTHON_CRC_LIMIT, key
                continue
            assert crc == e.crc32c, key
            assert staging._masked_crc32c(e, b.read(key)[:-1] + b"?") != e.crc32c or e.size == 0
            checked += 1
    assert checked == (23 if fast else 17)  # pure Python: the six 384 KiB tensors by size


def test_close_tensors_share_a_ranged_get_and_far_ones_do_not() -> None:
    entries = {
        "a": _entry(0, 0, 100),
        "b": _entry(0, 150, 100),  # 50 bytes after a: merged
        "far": _entry(0, 1_000_000, 100),  # a megabyte later: its own request
        "other_shard": _entry(1, 0, 100),
        "empty": _entry(0, 5000, 0),  # no bytes to fetch
        "unwanted": _entry(0, 250, 100),
    }
    b = bundle.Bundle("p", 2, entries)
    spans = plan_ranges(b, ["a", "b", "far", "other_shard", "empty"], gap=1000)
    assert [(s.shard, s.start, s.end, [t[0] for t in s.tensors]) for s in spans] == [
        (0, 0, 250, ["a", "b"]),
        (0, 1_000_000, 1_000_100, ["far"]),
        (1, 0, 100, ["other_shard"]),
    ]
    assert len(plan_ranges(b, ["a", "b"], gap=10)) == 2
    assert len(plan_ranges(b, ["a", "far"], gap=10**7, max_range=1000)) == 2
    with pytest.raises(KeyError):
        plan_ranges(b, ["not-there"])


def test_a_local_checkpoint_is_staged_not_fetched(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path / "ckpt-1", 1, (tmp_path / "ckpt-1.index",), 0, "fp")
    with pytest.raises(ValueError, match="stage_checkpoint"):
        fetch_checkpoint(ckpt, tmp_path / "staging")
    remote = Checkpoint(ObjectURL("s3", "bucket", "run/ckpt-1"), 1, (), 0, "fp")
    with pytest.raises(ValueError, match="fetch_checkpoint"):
        staging.stage_checkpoint(remote, tmp_path / "staging")


# -- against the servers --------------------------------------------------------


def _remote_checkpoint(
    store: ObjectStore, url: ObjectURL, folder: Path, name: str = "ckpt-3"
) -> Checkpoint:
    upload(store, url, folder)
    result = TFCheckpointSource().scan(url)
    return next(c for c in result.checkpoints if c.name == name)


@pytest.mark.objectstore
def test_fetch_whole_and_by_ranges_and_tensorflow_restores_from_the_sparse_files(
    object_store: tuple[ObjectStore, str, ObjectURL], written: Path, tmp_path: Path
) -> None:
    store, _, url = object_store
    ckpt = _remote_checkpoint(store, url, written / "adam")
    needed: list[str] = json.loads((written / "needed.json").read_text())
    full = sum(ckpt.sizes)

    whole_dir = tmp_path / "whole"
    seen: list[tuple[int, int]] = []
    prefix, method, nbytes = fetch_checkpoint(
        ckpt, whole_dir, progress=lambda done, total: seen.append((done, total))
    )
    assert (prefix, method, nbytes) == (whole_dir / "ckpt-3", "fetch", full)
    for name in ("ckpt-3.index", "ckpt-3.data-00000-of-00001"):
        assert (whole_dir / name).read_bytes() == (written / "adam" / name).read_bytes()
    assert seen[-1] == (full, full) and [d for d, _ in seen] == sorted(d for d, _ in seen)

    counting = CountingStore(store)
    ranged_dir = tmp_path / "ranged"
    prefix, method, nbytes = fetch_checkpoint(ckpt, ranged_dir, needed, client=counting)
    assert (prefix, method) == (ranged_dir / "ckpt-3", "fetch-ranges")
    print(
        f"\n{url.scheme}: ranged {nbytes} bytes of {full} ({nbytes / full:.0%}), {counting.calls}"
    )
    assert nbytes < 0.5 * full
    # The index whole, then the model's variables and the object graph (adjacent in
    # this file) in as few ranged GETs as their layout allows.
    entries = bundle.read_index(str(written / "adam" / "ckpt-3")).entries.values()
    small = sum(1 for e in entries if e.size <= staging.SMALL_TENSOR_BYTES)
    assert counting.calls["get"] == 1
    assert 1 <= counting.calls["get_range"] <= len(needed) + small
    assert counting.calls["download"] == 0
    shard = ranged_dir / "ckpt-3.data-00000-of-00001"
    original = (written / "adam" / "ckpt-3.data-00000-of-00001").read_bytes()
    assert shard.stat().st_size == len(original)
    assert shard.stat().st_blocks * 512 < len(original)  # sparse: the holes take no space
    sparse, index = shard.read_bytes(), bundle.read_index(str(written / "adam" / "ckpt-3"))
    for key, e in index.entries.items():
        stored = sparse[e.offset : e.offset + e.size]
        if key in needed or e.size <= staging.SMALL_TENSOR_BYTES:
            # What the model reads, and every small tensor (the step counters).
            assert stored == original[e.offset : e.offset + e.size], key
        elif "optimizer/_variables" in key:
            assert stored == bytes(e.size), key  # a large slot: never downloaded

    expected = json.loads((written / "values.json").read_text())
    assert restored_digests(ranged_dir / "ckpt-3") == expected


@pytest.mark.objectstore
def test_ranges_span_every_shard_and_sliced_tensors_fall_back_to_a_whole_fetch(
    object_store: tuple[ObjectStore, str, ObjectURL], written: Path, tmp_path: Path
) -> None:
    if not (written / "sharded").is_dir():
        pytest.skip("this TensorFlow cannot split a checkpoint into shards")
    store, _, url = object_store
    ckpt = _remote_checkpoint(store, url, written / "sharded")
    index = bundle.read_index(str(written / "sharded" / "ckpt-3"))
    # Whole tensors (not slices, not sliced) of at least two shards.
    plain = [k for k, e in index.entries.items() if not e.sliced and not k.startswith("\0")]
    assert len({index.entries[k].shard_id for k in plain}) > 1
    _, method, _ = fetch_checkpoint(ckpt, tmp_path / "plain", plain)
    assert method == "fetch-ranges"
    for key in plain:
        e = index.entries[key]
        name = Path(index.data_file(e.shard_id)).name
        stored = (tmp_path / "plain" / name).read_bytes()[e.offset : e.offset + e.size]
        assert stored == (written / "sharded" / name).read_bytes()[e.offset : e.offset + e.size]
    # A sliced variable's bytes are under other keys: everything is fetched instead.
    sliced = [k for k, e in index.entries.items() if e.sliced]
    _, method, nbytes = fetch_checkpoint(ckpt, tmp_path / "sliced", sliced)
    assert (method, nbytes) == ("fetch", sum(ckpt.sizes))
    # So is a key the index does not have.
    _, method, _ = fetch_checkpoint(ckpt, tmp_path / "missing", ["no/such/key"])
    assert method == "fetch"


@pytest.mark.objectstore
def test_a_tf1_checkpoint_fetched_by_ranges_brings_its_graph_whole(
    object_store: tuple[ObjectStore, str, ObjectURL], written: Path, tmp_path: Path
) -> None:
    store, _, url = object_store
    tf1 = tmp_path / "tf1"
    tf1.mkdir()
    for src in (written / "adam").glob("ckpt-3.*"):
        shutil.copy(src, tf1 / src.name.replace("ckpt-3", "model.ckpt-300"))
    (tf1 / "model.ckpt-300.meta").write_bytes(b"the graph" * 1000)
    upload(store, url, tf1)
    (ckpt,) = TF1CheckpointSource().scan(url).checkpoints
    needed: list[str] = json.loads((written / "needed.json").read_text())
    prefix, method, nbytes = fetch_checkpoint(ckpt, tmp_path / "staging", needed)
    assert (prefix, method) == (tmp_path / "staging" / "model.ckpt-300", "fetch-ranges")
    assert (tmp_path / "staging" / "model.ckpt-300.meta").read_bytes() == b"the graph" * 1000
    assert 9000 < nbytes < 0.5 * sum(ckpt.sizes)


@pytest.mark.objectstore
def test_a_checkpoint_deleted_before_or_during_the_fetch_vanished(
    object_store: tuple[ObjectStore, str, ObjectURL], written: Path, tmp_path: Path
) -> None:
    store, _, url = object_store
    ckpt = _remote_checkpoint(store, url, written / "adam")
    needed: list[str] = json.loads((written / "needed.json").read_text())
    shard = url.key("ckpt-3.data-00000-of-00001")

    def delete_shard(done: int, total: int) -> None:
        store.delete(shard)  # max_to_keep, right after the index came down

    with pytest.raises(CheckpointVanished, match=r"ckpt-3\.data-00000-of-00001"):
        fetch_checkpoint(ckpt, tmp_path / "during", needed, progress=delete_shard)
    with pytest.raises(CheckpointVanished):
        fetch_checkpoint(ckpt, tmp_path / "whole")
    store.delete(url.key("ckpt-3.index"))
    with pytest.raises(CheckpointVanished, match=r"ckpt-3\.index"):
        fetch_checkpoint(ckpt, tmp_path / "before", needed)
    # A trainer that restarted and wrote another ckpt-2 under the same name.
    ckpt2 = next(c for c in TFCheckpointSource().scan(url).checkpoints if c.name == "ckpt-2")
    store.put(url.key("ckpt-2.index"), (written / "adam" / "ckpt-1.index").read_bytes())
    with pytest.raises(CheckpointVanished, match="rewritten"):
        fetch_checkpoint(ckpt2, tmp_path / "replaced", needed)


@pytest.mark.objectstore
def test_a_tensor_whose_bytes_do_not_match_its_checksum_is_named(
    object_store: tuple[ObjectStore, str, ObjectURL], written: Path, tmp_path: Path
) -> None:
    store, _, url = object_store
    damaged = tmp_path / "damaged"
    shutil.copytree(written / "adam", damaged)
    index = bundle.read_index(str(damaged / "ckpt-3"))
    key = "optimizer/_trainable_variables/2/.ATTRIBUTES/VARIABLE_VALUE"
    e = index.entries[key]
    data = bytearray((damaged / "ckpt-3.data-00000-of-00001").read_bytes())
    data[e.offset + e.size // 2] ^= 0xFF  # one bit-flipped byte, same size: same fingerprint
    (damaged / "ckpt-3.data-00000-of-00001").write_bytes(bytes(data))
    os.utime(damaged / "ckpt-3.data-00000-of-00001")
    ckpt = _remote_checkpoint(store, url, damaged)
    with pytest.raises(ObjectStoreError) as err:
        fetch_checkpoint(ckpt, tmp_path / "staging", [key])
    assert err.value.kind == "corrupt"
    assert key in str(err.value) and "ckpt-3.data-00000-of-00001" in str(err.value)


def test_progress_calls_never_overlap_and_count_up() -> None:
    state = staging._Fetch(client=None, total=10, progress=None)  # type: ignore[arg-type]
    calls: Counter[int] = Counter()
    state.progress = lambda done, total: calls.update([done])
    for n in (3, 3, 4):
        state.add(n)
    assert sorted(calls) == [3, 6, 10] and state.done == 10
