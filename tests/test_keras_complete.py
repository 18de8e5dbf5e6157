"""Completeness of Keras files without waiting: the ZIP and HDF5 checks, and the scanner.

The codecs (``daemon.formats.zip_archive``, ``daemon.formats.hdf5``) on files
written by :mod:`zipfile` and h5py: the whole file is complete, every prefix
is not. Then real Keras writes (``ModelCheckpoint``, ``model.save``, a file
saved twice under one name), replayed write call by write call from
``strace``, so that every state a reader could see while Keras writes is
checked, not only prefixes: only the final state may count.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import child_env

from daemon.formats.completeness import Verdict, bytes_reader
from daemon.formats.hdf5 import check_file as check_hdf5
from daemon.formats.hdf5 import lookup3
from daemon.formats.zip_archive import check_archive
from daemon.sources.keras_file import KerasFileSource, check_file

HOUR_AGO = time.time() - 3600


def zip_verdict(data: bytes) -> Verdict:
    return check_archive(bytes_reader(data), len(data))[0].verdict


def hdf5_verdict(data: bytes) -> Verdict:
    return check_hdf5(bytes_reader(data), len(data)).verdict


def keras_zip(path: Path, *, weights: bytes = b"w" * 5000) -> bytes:
    with zipfile.ZipFile(path, "w") as z:
        with z.open("metadata.json", "w") as f:
            f.write(b"{}")
        with z.open("config.json", "w") as f:
            f.write(b'{"class_name": "Functional"}')
        z.writestr("model.weights.h5", weights)
    return path.read_bytes()


def h5(path: Path, **kw: object) -> bytes:
    with h5py.File(path, "w", **kw) as f:
        for i in range(3):
            f[f"layers/dense_{i}/vars/0"] = np.arange(300.0 * (i + 1))
    return path.read_bytes()


# --- ZIP ----------------------------------------------------------------------


def test_a_zip_is_complete_whole_and_incomplete_at_every_shorter_length(tmp_path: Path) -> None:
    data = keras_zip(tmp_path / "m.keras")
    check, names = check_archive(bytes_reader(data), len(data))
    assert check.complete and names == ("metadata.json", "config.json", "model.weights.h5")
    assert [n for n in range(len(data)) if zip_verdict(data[:n]) is not Verdict.INCOMPLETE] == []


def test_a_zip_whose_directory_disagrees_is_incomplete(tmp_path: Path) -> None:
    data = bytearray(keras_zip(tmp_path / "m.keras"))
    eocd = len(data) - 22
    entries_at, offset_at = eocd + 10, eocd + 16
    cd_offset = struct.unpack_from("<I", data, offset_at)[0]
    wrong_count = bytearray(data)
    struct.pack_into("<H", wrong_count, entries_at, 2)
    struct.pack_into("<H", wrong_count, entries_at - 2, 2)
    assert zip_verdict(bytes(wrong_count)) is Verdict.INCOMPLETE
    moved_header = bytearray(data)  # the second member's local header offset, off by one
    second = cd_offset + 46 + len("metadata.json")
    struct.pack_into(
        "<I", moved_header, second + 42, struct.unpack_from("<I", data, second + 42)[0] + 1
    )
    check = check_archive(bytes_reader(bytes(moved_header)), len(data))[0]
    assert check.verdict is Verdict.INCOMPLETE and "local header" in check.reason
    zeroed = bytes(data[:100]) + b"\0" * 200 + bytes(data[300:])  # data never written
    assert zip_verdict(zeroed) is Verdict.INCOMPLETE
    assert zip_verdict(b"not a zip at all" * 10) is Verdict.INCOMPLETE


def test_a_zip_comment_and_bytes_before_the_archive(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "c.keras", "w") as z:
        z.writestr("config.json", "{}")
        z.comment = b"a comment"
    data = (tmp_path / "c.keras").read_bytes()
    assert zip_verdict(data) is Verdict.COMPLETE
    assert zip_verdict(data[:-1]) is Verdict.INCOMPLETE
    # Prepended bytes (a self-extracting archive): not what Keras writes; undecided.
    with zipfile.ZipFile(tmp_path / "p.keras", "w") as z:
        z.writestr("config.json", "{}")
    plain = (tmp_path / "p.keras").read_bytes()
    shifted = bytearray(b"PK\x03\x04" + b"\0" * 60 + plain)
    assert zip_verdict(bytes(shifted)) is Verdict.UNDECIDED


def test_zip64_end_records_are_read(tmp_path: Path) -> None:
    path = tmp_path / "many.keras"
    with zipfile.ZipFile(path, "w") as z:  # more than 65535 entries: a ZIP64 end record
        z.writestr("config.json", "{}")
        for i in range(65_536):
            z.writestr(f"{i}", b"")
    data = path.read_bytes()
    assert data[-22 - 20 : -22][:4] == b"PK\x06\x07"  # the ZIP64 locator is there
    check, names = check_archive(bytes_reader(data), len(data))
    assert check.complete and len(names) == 65_537
    for cut in (len(data) - 1, len(data) - 22, len(data) - 30, len(data) - 80, len(data) // 2):
        assert zip_verdict(data[:cut]) is Verdict.INCOMPLETE, cut
    big = tmp_path / "big.keras"  # ZIP64 extra fields per entry
    with zipfile.ZipFile(big, "w") as z, z.open("config.json", "w", force_zip64=True) as f:
        f.write(b"{}")
    assert zip_verdict(big.read_bytes()) is Verdict.COMPLETE


# --- HDF5 ---------------------------------------------------------------------


def test_lookup3_matches_the_reference_vectors() -> None:
    assert lookup3(b"") == 0xDEADBEEF
    assert lookup3(b"Four score and seven years ago") == 0x17770551
    assert lookup3(b"Four score and seven years ago", 1) == 0xCD628161


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"libver": "latest"},
        {"userblock_size": 1024},
        {"libver": "latest", "userblock_size": 512},
    ],
    ids=["v0", "v3", "v0_userblock", "v3_userblock"],
)
def test_hdf5_is_complete_whole_and_incomplete_at_every_shorter_length(
    tmp_path: Path, kw: dict[str, object]
) -> None:
    data = h5(tmp_path / "w.h5", **kw)
    assert hdf5_verdict(data) is Verdict.COMPLETE
    assert [n for n in range(len(data)) if hdf5_verdict(data[:n]) is not Verdict.INCOMPLETE] == []


def test_hdf5_superblock_marks_and_what_cannot_be_decided(tmp_path: Path) -> None:
    v0 = h5(tmp_path / "v0.h5")
    v3 = h5(tmp_path / "v3.h5", libver="latest")
    open_v0 = bytearray(v0)
    open_v0[20] |= 0x01  # file consistency flags: open for write access
    assert hdf5_verdict(bytes(open_v0)) is Verdict.INCOMPLETE
    torn_v3 = bytearray(v3)
    torn_v3[28] ^= 0xFF  # inside the end-of-file address: the checksum no longer matches
    check = check_hdf5(bytes_reader(bytes(torn_v3)), len(v3))
    assert check.verdict is Verdict.INCOMPLETE and "checksum" in check.reason
    assert hdf5_verdict(v0 + b"\0") is Verdict.UNDECIDED  # longer than its recorded end
    undefined = bytearray(v0)
    undefined[40:48] = b"\xff" * 8  # v0: base, free space, *end of file*, driver addresses
    assert hdf5_verdict(bytes(undefined)) is Verdict.UNDECIDED
    assert hdf5_verdict(v0[:8] + b"\x09" + v0[9:]) is Verdict.UNDECIDED  # unknown version
    assert hdf5_verdict(b"garbage" * 100) is Verdict.INCOMPLETE


# --- the scanner --------------------------------------------------------------


def test_the_scanner_takes_a_complete_file_at_once_and_waits_for_the_rest(tmp_path: Path) -> None:
    whole = keras_zip(tmp_path / "src.keras")
    weights = h5(tmp_path / "src.h5")
    d = tmp_path / "ckpts"
    d.mkdir()
    (d / "m-1.keras").write_bytes(whole)
    (d / "m-2.keras").write_bytes(whole[:-10])
    (d / "m-3.weights.h5").write_bytes(weights)
    (d / "m-4.weights.h5").write_bytes(weights + b"\0")  # undecided: waits for settle_seconds
    source = KerasFileSource({"pattern": "m-*", "settle_seconds": 30})
    result = source.scan(d)
    assert sorted(c.name for c in result.checkpoints) == ["m-1.keras", "m-3.weights.h5"]
    assert sorted(result.incomplete) == ["m-2.keras", "m-4.weights.h5"]
    assert result.recheck_at is not None and 25 < result.recheck_at - time.time() <= 30
    for p in d.iterdir():
        os.utime(p, (HOUR_AGO, HOUR_AGO))
    result = source.scan(d)  # the fallback: unchanged for settle_seconds
    assert sorted(c.name for c in result.checkpoints) == [
        "m-1.keras",
        "m-3.weights.h5",
        "m-4.weights.h5",
    ]
    assert result.problems == [
        f"{d / 'm-2.keras'}: not a readable .keras archive (File is not a zip file); skipped"
    ]


def test_a_zip_without_config_json_is_no_keras_archive(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "x.keras", "w") as z:
        z.writestr("other.json", "{}")
    data = (tmp_path / "x.keras").read_bytes()
    check = check_file("x.keras", bytes_reader(data), len(data))
    assert check.verdict is Verdict.INCOMPLETE and "config.json" in check.reason


def test_a_file_that_changes_while_it_is_read_is_not_taken(tmp_path: Path) -> None:
    data = keras_zip(tmp_path / "m.keras")

    class Racing(KerasFileSource):
        def _fingerprint(self, path: Path, st: os.stat_result, fd: int) -> str:
            fp = super()._fingerprint(path, st, fd)
            path.write_bytes(data[:100])  # the trainer starts rewriting it, same name
            return fp

    source = Racing({"settle_seconds": 30})
    result = source.scan(tmp_path)
    assert result.checkpoints == [] and result.incomplete == ["m.keras"]
    assert source._fp_cache == {}
    (tmp_path / "m.keras").write_bytes(data)
    assert [c.name for c in KerasFileSource({"settle_seconds": 30}).scan(tmp_path).checkpoints] == [
        "m.keras"
    ]


# --- real Keras writes, replayed call by call -----------------------------------

_SAVE = """
import sys, keras, numpy as np
from daemon.demo.model import build_model
out = sys.argv[1]
model = build_model()
model.compile(optimizer="adam", loss="mse")
x, y = np.random.rand(64, 4).astype("float32"), np.random.rand(64, 1).astype("float32")
model.fit(x, y, epochs=2, verbose=0, callbacks=[
    keras.callbacks.ModelCheckpoint(out + "/model-{epoch}.keras"),
    keras.callbacks.ModelCheckpoint(out + "/model-{epoch}.weights.h5", save_weights_only=True),
    keras.callbacks.ModelCheckpoint(out + "/best.keras"),
    keras.callbacks.ModelCheckpoint(out + "/best.weights.h5", save_weights_only=True),
])
for epoch in (1, 2):
    model.fit(x, y, epochs=1, verbose=0)
    model.save(f"{out}/model-{epoch}.h5")
    model.save(f"{out}/same.h5")
"""

_TRACED = "openat,write,pwrite64,writev,pwritev,pwritev2,lseek,ftruncate,close,dup,dup2,dup3"
_CALL = re.compile(r"^(\d+)\s+(\w+)\((.*)\)\s+=\s+(-?\d+)")
_HEX = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')


def _unhex(s: str) -> bytes:
    return bytes.fromhex(s.replace("\\x", ""))


def replay(trace: str, folder: str) -> Iterator[tuple[str, int, bytes]]:
    """(path, write session, content) after every call that changed a file under ``folder``.

    A session starts at an ``open(O_TRUNC)``: one save. Reconstructed from
    ``strace -xx`` output of ``write``/``pwrite64``/``lseek``/``ftruncate``.
    """
    files: dict[str, bytearray] = {}
    sessions: dict[str, int] = {}
    fds: dict[int, list[object]] = {}  # fd -> [path, position]
    pending: dict[str, str] = {}
    for line in trace.splitlines():
        pid, _, rest = line.partition(" ")
        rest = rest.strip()
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest.removesuffix("<unfinished ...>")
            continue
        if rest.startswith("<..."):
            rest = pending.pop(pid, "") + rest.split("resumed>", 1)[1]
        m = _CALL.match(f"{pid} {rest}")
        if not m or int(m.group(4)) < 0:
            continue
        call, args, ret = m.group(2), m.group(3), int(m.group(4))
        if call == "openat":
            hexpath = _HEX.search(args)
            path = _unhex(hexpath.group(1)).decode() if hexpath else ""
            fds.pop(ret, None)
            if path.startswith(folder):
                if "O_TRUNC" in args or path not in files:
                    files[path] = bytearray()
                    sessions[path] = sessions.get(path, -1) + 1
                    yield path, sessions[path], b""
                fds[ret] = [path, 0]
            continue
        fd_text = args.split(",", 1)[0]
        if not fd_text.isdigit() or int(fd_text) not in fds:
            continue
        entry = fds[int(fd_text)]
        path = str(entry[0])
        buf = files[path]
        if call in ("write", "pwrite64"):
            hexdata = _HEX.search(args)
            assert hexdata is not None
            data = _unhex(hexdata.group(1))[:ret]
            at = int(str(entry[1])) if call == "write" else int(args.rsplit(",", 1)[1])
            buf.extend(b"\0" * max(0, at - len(buf)))
            buf[at : at + len(data)] = data
            if call == "write":
                entry[1] = at + len(data)
            yield path, sessions[path], bytes(buf)
        elif call == "lseek":
            entry[1] = ret
        elif call == "ftruncate":
            n = int(args.split(",")[1])
            del buf[n:]
            buf.extend(b"\0" * (n - len(buf)))
            yield path, sessions[path], bytes(buf)
        elif call == "close":
            del fds[int(fd_text)]
        elif call.startswith("dup"):
            fds[ret] = entry
        else:
            raise AssertionError(f"{call} on a Keras file: the replay does not model it")


@pytest.mark.e2e
def test_real_keras_writes_are_complete_only_when_done(tmp_path: Path) -> None:
    strace = shutil.which("strace")
    out = tmp_path / "out"
    out.mkdir()
    argv = [sys.executable, "-c", _SAVE, str(out)]
    trace = tmp_path / "trace"
    if strace:
        argv = [strace, "-f", "-qq", "-xx", "-s", "100000000", "-e", f"trace={_TRACED}",
                "-o", str(trace), *argv]  # fmt: skip
    r = subprocess.run(argv, env=child_env(), capture_output=True, text=True, timeout=300)
    if strace and r.returncode != 0 and "ptrace" in r.stderr:
        pytest.skip(f"strace cannot trace here: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    written = sorted(p.name for p in out.iterdir())
    assert {"model-1.keras", "model-2.weights.h5", "model-1.h5", "best.keras", "same.h5"} <= set(
        written
    )
    # Every prefix of every file Keras wrote (dense sampling above 4 KiB, every byte below).
    for name in written:
        data = (out / name).read_bytes()
        assert check_file(name, bytes_reader(data), len(data)).complete, name
        cuts = sorted({*range(min(len(data), 4096)), *range(0, len(data), 7)})
        early = [n for n in cuts if check_file(name, bytes_reader(data[:n]), n).complete]
        assert early == [], (name, early[:5])
    if not strace:
        pytest.skip("no strace: the call-by-call replay was not run")
    # Every state the files passed through while Keras wrote them, in order.
    states: dict[tuple[str, int], list[bytes]] = {}
    for path, session, content in replay(trace.read_text(), str(out) + "/"):
        states.setdefault((path, session), []).append(content)
    assert {Path(p).name for p, _ in states} == set(written)
    assert len([k for k in states if k[0].endswith("same.h5")]) == 2  # rewritten in place
    scanned = tmp_path / "scan"
    scanned.mkdir()
    source = KerasFileSource({"pattern": "*", "settle_seconds": 30})
    taken = 0
    for (path, session), contents in states.items():
        final = contents[-1]
        name = Path(path).name
        assert check_file(name, bytes_reader(final), len(final)).complete, (path, session)
        for content in contents:
            (scanned / name).write_bytes(content)
            found = [c.name for c in source.scan(scanned).checkpoints]
            if content == final:
                taken += bool(found)
            else:
                assert found == [], (path, session, len(content), len(final))
            (scanned / name).unlink()
    assert taken >= len(states)
