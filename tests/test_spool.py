"""The disk spool: order, bounds, commits and recovery from torn, corrupt and killed writes, on real files."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.spool import FRAME_OVERHEAD, HEADER_BYTES, Spool, SpoolLocked, encode_frame

ROOT = Path(__file__).resolve().parents[1]
Record = dict[bytes, bytes]


def record(seq: int, *, size: int | None = None) -> Record:
    """A record whose body is derived from its sequence number (so any mix-up shows)."""
    digest = hashlib.sha256(str(seq).encode()).digest()
    size = seq % 300 if size is None else size
    return {b"seq": str(seq).encode(), b"body": (digest * (size // 32 + 1))[:size]}


def seqs(records: list[Record]) -> list[int]:
    return [int(r[b"seq"]) for r in records]


def drain(spool: Spool, *, max_records: int = 7, max_bytes: int = 2_000, commit: bool = True) -> list[Record]:
    """Everything readable, in small reads, each committed."""
    out: list[Record] = []
    while True:
        batch, cursor = spool.read(max_records, max_bytes)
        if not batch:
            return out
        out += batch
        if commit:
            spool.commit(cursor)


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def bytes_on_disk(directory: Path) -> int:
    return sum(p.stat().st_size for p in segment_files(directory))


def child(source: str, directory: Path, *, stdin: int | None = None) -> subprocess.Popen[str]:
    """A Python process running ``source`` on ``directory`` with this worktree's proxy package; stdout piped."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", source, str(directory)]
    return subprocess.Popen(command, env=env, cwd=ROOT, text=True, stdin=stdin, stdout=subprocess.PIPE)


def test_records_round_trip_with_binary_fields(tmp_path: Path) -> None:
    """Keys and values of any bytes (NUL, 0xff, empty, 300 KB) and an empty record come back equal, also reopened."""
    records: list[Record] = [
        {b"a": bytes(range(256)), b"\x00\xff": b"", b"": b"\x00" * 3},
        {},
        {b"body.live": os.urandom(300_000), b"meta": b'{"v": 2}'},
    ]
    with Spool(tmp_path, max_bytes=10**7) as spool:
        assert spool.append(records) == 3
        assert drain(spool, commit=False) == records
    with Spool(tmp_path, max_bytes=10**7) as spool:
        assert drain(spool) == records


def test_records_come_out_in_append_order_across_many_segments(tmp_path: Path) -> None:
    """Batches of any size spread over dozens of segments are read back in append order, before and after a restart."""
    expected = [record(i) for i in range(600)]
    with Spool(tmp_path, max_bytes=10**7, segment_bytes=2_048) as spool:
        start = 0
        for size in [1, 5, 50, 3, 200, 1, 340]:
            assert spool.append(expected[start : start + size]) == size
            start += size
        assert len(segment_files(tmp_path)) > 20
        assert [p.name for p in segment_files(tmp_path)][0] == "00000000000000000001.seg"
        assert drain(spool, commit=False, max_records=13) == expected
    with Spool(tmp_path, max_bytes=10**7, segment_bytes=2_048) as spool:
        assert spool.pending_records == 600
        assert drain(spool, max_records=1000, max_bytes=5_000) == expected


def test_a_read_returns_at_least_one_record_even_over_max_bytes(tmp_path: Path) -> None:
    """A record larger than the read's byte budget still comes out alone, so a sender never stalls."""
    with Spool(tmp_path, max_bytes=10**6) as spool:
        spool.append([record(0, size=5_000), record(1, size=5_000)])
        batch, _ = spool.read(10, 100)
        assert seqs(batch) == [0]


def test_commit_deletes_delivered_segments_and_frees_bytes(tmp_path: Path) -> None:
    """Committing past segments deletes their files; the byte and record counts follow the files."""
    with Spool(tmp_path, max_bytes=10**7, segment_bytes=4_096) as spool:
        spool.append([record(i, size=200) for i in range(200)])
        files, disk = len(segment_files(tmp_path)), spool.disk_bytes
        assert disk == bytes_on_disk(tmp_path)
        assert spool.pending_records == 200
        assert spool.pending_bytes == sum(len(encode_frame(record(i, size=200))) for i in range(200))
        batch, cursor = spool.read(120, 10**6)
        spool.commit(cursor)
        assert spool.pending_records == 80
        assert len(segment_files(tmp_path)) < files
        assert spool.disk_bytes == bytes_on_disk(tmp_path) < disk
        drain(spool)
        assert spool.pending_records == spool.pending_bytes == 0
        assert len(segment_files(tmp_path)) == 1  # the active segment, reused by the next append


def test_rewind_returns_to_the_committed_cursor(tmp_path: Path) -> None:
    """After a failed send, rewind makes the uncommitted records readable again, in order."""
    with Spool(tmp_path, max_bytes=10**6) as spool:
        spool.append([record(i) for i in range(10)])
        first, cursor = spool.read(3, 10**6)
        spool.commit(cursor)
        second, _ = spool.read(4, 10**6)
        spool.rewind()
        again, _ = spool.read(100, 10**6)
        assert seqs(first + second) == list(range(7))
        assert seqs(again) == list(range(3, 10))


def test_commit_is_monotonic_and_refuses_unread_positions(tmp_path: Path) -> None:
    """Committing an older cursor again changes nothing; a cursor beyond the read position is refused."""
    with Spool(tmp_path, max_bytes=10**6) as spool:
        spool.append([record(i) for i in range(10)])
        _, early = spool.read(2, 10**6)
        _, late = spool.read(2, 10**6)
        spool.commit(late)
        spool.commit(early)
        assert spool.committed == late and spool.pending_records == 6
        spool.rewind()
        _, beyond = spool.read(3, 10**6)
        spool.rewind()
        with pytest.raises(ValueError, match="beyond the read position"):
            spool.commit(beyond)


def test_a_restart_replays_only_unacknowledged_records(tmp_path: Path) -> None:
    """Committed records never come back; read-but-uncommitted and unread ones do, in order."""
    with Spool(tmp_path, max_bytes=10**6, segment_bytes=1_024) as spool:
        spool.append([record(i) for i in range(100)])
        _, cursor = spool.read(30, 10**6)
        spool.commit(cursor)
        spool.read(20, 10**6)  # sent, but the process dies before the commit
    with Spool(tmp_path, max_bytes=10**6, segment_bytes=1_024) as spool:
        assert spool.pending_records == 70
        assert seqs(drain(spool)) == list(range(30, 100))
    with Spool(tmp_path, max_bytes=10**6, segment_bytes=1_024) as spool:
        assert drain(spool) == []
        spool.append([record(100)])
        assert seqs(drain(spool)) == [100]


def test_a_torn_last_record_at_every_byte_offset_is_truncated_and_counted(tmp_path: Path) -> None:
    """Cut anywhere inside the last record, the file reopens with every complete record, one corrupt
    record counted, the torn bytes gone, and appends continuing after the last good record."""
    source = tmp_path / "source"
    with Spool(source, max_bytes=10**6) as spool:
        spool.append([record(i) for i in range(20)])
    (segment,) = segment_files(source)
    data = segment.read_bytes()
    start = len(data) - len(encode_frame(record(19)))
    for cut in range(start, len(data)):
        directory = tmp_path / f"cut{cut}"
        directory.mkdir()
        (directory / segment.name).write_bytes(data[:cut])
        with Spool(directory, max_bytes=10**6) as spool:
            assert (spool.corrupt_records, spool.discarded_bytes) == ((cut > start), cut - start)
            assert seqs(drain(spool, commit=False)) == list(range(19))
            spool.append([record(99)])
        with Spool(directory, max_bytes=10**6) as spool:
            assert spool.corrupt_records == 0
            assert drain(spool) == [record(i) for i in range(19)] + [record(99)]
        shutil.rmtree(directory)


def test_a_segment_torn_inside_its_header_is_dropped_without_losing_records(tmp_path: Path) -> None:
    """A crash right after a new segment was created leaves a short file: it held no record and goes."""
    with Spool(tmp_path, max_bytes=10**6, segment_bytes=1_024) as spool:
        spool.append([record(i) for i in range(30)])
    last = segment_files(tmp_path)[-1]
    following = tmp_path / f"{int(last.stem) + 1:020d}.seg"
    for cut in range(HEADER_BYTES):
        following.write_bytes(last.read_bytes()[:cut])
        with Spool(tmp_path, max_bytes=10**6, segment_bytes=1_024) as spool:
            assert spool.corrupt_records == 0
            assert seqs(drain(spool, commit=False)) == list(range(30))
        assert not following.exists()


def corrupt(path: Path, offset: int, value: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + len(value)] = value
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["payload", "length"])
def test_corruption_in_an_older_segment_skips_the_rest_of_that_segment(tmp_path: Path, damage: str) -> None:
    """A bad CRC or an impossible length mid-segment loses that segment's remainder, is counted once, and
    every other segment is still read in order."""
    with Spool(tmp_path, max_bytes=10**6, segment_bytes=1_200) as spool:
        spool.append([record(i, size=100) for i in range(40)])
    second = segment_files(tmp_path)[1]
    frame = len(encode_frame(record(0, size=100)))
    per_segment = (second.stat().st_size - HEADER_BYTES) // frame
    third_record = HEADER_BYTES + 2 * frame
    if damage == "payload":
        corrupt(second, third_record + FRAME_OVERHEAD + 20, b"\xff\xfe")
    else:
        corrupt(second, third_record, b"\xff\xff\xff\x7f")
    with Spool(tmp_path, max_bytes=10**6, segment_bytes=1_200) as spool:
        got = seqs(drain(spool))
        lost = list(range(per_segment + 2, 2 * per_segment))
        assert got == [i for i in range(40) if i not in lost]
        assert spool.corrupt_records == 1
        assert spool.discarded_bytes == sum(len(encode_frame(record(i, size=100))) for i in lost)
        assert drain(spool) == []  # nothing loops, nothing repeats
        spool.append([record(40)])
        assert seqs(drain(spool)) == [40]


def test_corruption_in_the_middle_of_the_last_segment_truncates_it_there(tmp_path: Path) -> None:
    """In the segment being written, a corrupt record ends the log: it and what follows go, counted once."""
    with Spool(tmp_path, max_bytes=10**6) as spool:
        spool.append([record(i, size=50) for i in range(10)])
    (segment,) = segment_files(tmp_path)
    frame = len(encode_frame(record(0, size=50)))
    corrupt(segment, HEADER_BYTES + 4 * frame + FRAME_OVERHEAD + 5, b"!")
    with Spool(tmp_path, max_bytes=10**6) as spool:
        assert (spool.corrupt_records, spool.discarded_bytes) == (1, 6 * frame)
        assert segment.stat().st_size == HEADER_BYTES + 4 * frame
        spool.append([record(10, size=50)])
        assert seqs(drain(spool)) == [0, 1, 2, 3, 10]


def test_corruption_found_while_reading_the_active_segment_moves_appends_to_a_new_one(tmp_path: Path) -> None:
    """Damage under a running spool is counted when read; later appends land in a fresh segment and are read."""
    with Spool(tmp_path, max_bytes=10**6) as spool:
        spool.append([record(i, size=50) for i in range(5)])
        (segment,) = segment_files(tmp_path)
        frame = len(encode_frame(record(0, size=50)))
        corrupt(segment, HEADER_BYTES + 2 * frame + FRAME_OVERHEAD + 5, b"!")
        assert seqs(drain(spool)) == [0, 1]
        spool.append([record(5, size=50)])
        assert seqs(drain(spool)) == [5]
        assert spool.corrupt_records == 1
        assert [p.name for p in segment_files(tmp_path)] == ["00000000000000000002.seg"]


def test_appends_stop_at_max_bytes_and_resume_after_commits(tmp_path: Path) -> None:
    """The segment files never exceed max_bytes: a batch is accepted up to a prefix, then nothing, until
    commits free space; a record that could never fit is refused outright."""
    max_bytes = 10_000
    with Spool(tmp_path, max_bytes=max_bytes, segment_bytes=3_000) as spool:
        assert spool.append([record(0, size=max_bytes)]) == 0
        seq = 0
        for _ in range(5):
            batch = [record(i, size=500) for i in range(seq, seq + 30)]
            accepted = spool.append(batch)
            assert 0 < accepted < 30
            assert bytes_on_disk(tmp_path) == spool.disk_bytes <= max_bytes
            assert spool.append(batch[accepted:]) == 0
            assert seqs(drain(spool)) == list(range(seq, seq + accepted))
            assert bytes_on_disk(tmp_path) <= max_bytes
            seq += accepted


def test_a_spool_smaller_than_one_segment_keeps_cycling(tmp_path: Path) -> None:
    """With max_bytes below segment_bytes, a fully delivered segment is reclaimed so appends go on."""
    with Spool(tmp_path, max_bytes=5_000, segment_bytes=16 * 1024**2) as spool:
        seq = 0
        for _ in range(4):
            accepted = spool.append([record(i, size=400) for i in range(seq, seq + 50)])
            assert accepted > 5
            assert bytes_on_disk(tmp_path) <= 5_000
            assert seqs(drain(spool)) == list(range(seq, seq + accepted))
            seq += accepted


def test_fsync_mode_round_trips(tmp_path: Path) -> None:
    """With fsync on, appends and rotations behave the same."""
    with Spool(tmp_path, max_bytes=10**6, segment_bytes=1_000, fsync=True) as spool:
        spool.append([record(i) for i in range(20)])
        assert seqs(drain(spool)) == list(range(20))


HOLD_LOCK = """
import sys
from proxy.spool import Spool
spool = Spool(sys.argv[1], max_bytes=10**6)
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_directory_held_by_another_process_is_refused_with_its_name(tmp_path: Path) -> None:
    """A second process (or a second Spool) on the same directory gets SpoolLocked naming it, until the holder exits."""
    holder = child(HOLD_LOCK, tmp_path, stdin=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(SpoolLocked, match=re.escape(str(tmp_path)) + r".*pid \d+"):
            Spool(tmp_path, max_bytes=10**6)
    finally:
        holder.communicate(input="")
    with Spool(tmp_path, max_bytes=10**6), pytest.raises(SpoolLocked):
        Spool(tmp_path, max_bytes=10**6)


APPEND_UNTIL_KILLED = """
import hashlib, sys
from proxy.spool import Spool

def record(seq):
    digest = hashlib.sha256(str(seq).encode()).digest()
    size = 2_000 + seq % 4_000
    return {b"seq": str(seq).encode(), b"body": (digest * (size // 32 + 1))[:size]}

spool = Spool(sys.argv[1], max_bytes=10**9, segment_bytes=64 * 1024)
appended = committed = 0
while True:
    appended += spool.append([record(appended + i) for i in range(1 + appended % 9)])
    if appended % 4 == 0:
        batch, cursor = spool.read(20, 10**6)
        spool.commit(cursor)
        committed += len(batch)
    print(appended, committed, flush=True)
"""


def test_a_process_killed_mid_append_loses_no_accepted_record(tmp_path: Path) -> None:
    """After SIGKILL, reopening yields every record append() had accepted past the last commit: none
    committed, none twice, in order, intact."""
    writer = child(APPEND_UNTIL_KILLED, tmp_path)
    assert writer.stdout is not None
    appended = committed = 0
    while appended < 3_000:
        line = writer.stdout.readline()
        assert line, "the writer exited early"
        appended, committed = map(int, line.split())
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    writer.stdout.close()
    with Spool(tmp_path, max_bytes=10**9, segment_bytes=64 * 1024) as spool:
        assert spool.corrupt_records <= 1  # a write torn by the kill
        got = drain(spool, max_records=500, max_bytes=10**7)
    first = int(got[0][b"seq"])
    assert committed <= first
    assert seqs(got) == list(range(first, first + len(got)))
    assert first + len(got) >= appended
    assert all(r[b"body"] == record(int(r[b"seq"]), size=2_000 + int(r[b"seq"]) % 4_000)[b"body"] for r in got)


FILL_UNTIL_FULL = """
import json, resource, signal, sys
from proxy.spool import Spool

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))
spool = Spool(sys.argv[1], max_bytes=10**7)
accepted = 0
while True:
    batch = [{b"seq": str(accepted + i).encode(), b"body": b"x" * 700} for i in range(10)]
    got = spool.append(batch)
    accepted += got
    if got < len(batch):
        break
errors = spool.write_errors
spool.close()
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
with Spool(sys.argv[1], max_bytes=10**7) as spool:
    records, _ = spool.read(10**6, 10**9)
print(json.dumps({"accepted": accepted, "errors": errors, "corrupt": spool.corrupt_records,
                  "seqs": [int(r[b"seq"]) for r in records]}))
"""


def test_a_failed_write_keeps_only_whole_accepted_records(tmp_path: Path) -> None:
    """When the disk refuses a write (here a file size limit), the partial write is undone, the batch is
    reported as not accepted and counted, and the spool reopens clean with exactly the accepted records."""
    filler = child(FILL_UNTIL_FULL, tmp_path)
    out, _ = filler.communicate()
    result = json.loads(out.splitlines()[-1])  # after structlog's warning line
    assert result["errors"] == 1 and result["corrupt"] == 0
    assert result["seqs"] == list(range(result["accepted"]))
    assert result["accepted"] > 0
