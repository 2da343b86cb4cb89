"""A bounded, crash-safe, ordered disk spool (write-ahead log) of records on their way to Redis.

Records are appended to numbered segment files and read back in exactly append order; ``commit``
durably moves a cursor past what was delivered and deletes segments left wholly behind it. After a
restart, everything after the committed cursor is replayed (at least once). Invariants: the segment
files never hold more than ``max_bytes`` on disk together, and a record is returned only if its
CRC-32 matches. Blocking file I/O: the caller runs the methods in a thread; they serialise on one lock.
Format, guarantees and sizing: ``docs/spool.md``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import struct
import threading
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import structlog

log = structlog.get_logger("shadow_proxy.spool")

VERSION = 1
SEGMENT_MAGIC = b"SHSPOOL" + bytes([VERSION])  # the 8-byte header of every segment file
CURSOR_MAGIC = b"SHCURSR" + bytes([VERSION])
HEADER_BYTES = len(SEGMENT_MAGIC)
_U32 = struct.Struct("<I")
_FRAME = struct.Struct("<II")  # payload length, CRC-32 of (length bytes + payload)
_CURSOR = struct.Struct("<8sQQI")  # magic, segment, offset, CRC-32 of what precedes it
FRAME_OVERHEAD = _FRAME.size
_MIN_PAYLOAD = 4  # the field count: an all-zero (length 0) frame is never valid
_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")


class SpoolLocked(RuntimeError):
    """Another live process holds the spool directory."""


@dataclass(frozen=True, slots=True, order=True)
class Cursor:
    """A position between records: ``index`` records (ending at byte ``offset``) into ``segment``. Opaque."""

    segment: int
    offset: int
    index: int


@dataclass(slots=True)
class _Segment:
    id: int
    path: Path
    size: int  # bytes on disk
    end: int  # end of the last readable record
    records: int  # readable records


def encode_record(record: Mapping[bytes, bytes]) -> bytes:
    """The payload: u32 field count, then per field u32 key length, key, u32 value length, value."""
    parts = [_U32.pack(len(record))]
    for key, value in record.items():
        parts += (_U32.pack(len(key)), key, _U32.pack(len(value)), value)
    return b"".join(parts)


def decode_record(payload: bytes) -> dict[bytes, bytes]:
    """The inverse of ``encode_record``; ValueError if the payload is not exactly one record."""
    view, pos, fields = memoryview(payload), 4, []
    try:
        (count,) = _U32.unpack_from(view, 0)
        for _ in range(2 * count):
            (size,) = _U32.unpack_from(view, pos)
            fields.append(bytes(view[pos + 4 : pos + 4 + size]))
            pos += 4 + size
    except struct.error as exc:
        raise ValueError("truncated record payload") from exc
    if pos != len(payload):
        raise ValueError("record payload length mismatch")
    return dict(zip(fields[::2], fields[1::2], strict=True))


def encode_frame(record: Mapping[bytes, bytes]) -> bytes:
    payload = encode_record(record)
    length = _U32.pack(len(payload))
    return length + _U32.pack(zlib.crc32(payload, zlib.crc32(length))) + payload


def _read_payload(fd: int, offset: int, limit: int) -> bytes | None:
    """The verified payload of the frame at ``offset``, or None if it is torn, overlong or corrupt."""
    head = os.pread(fd, FRAME_OVERHEAD, offset)
    if len(head) < FRAME_OVERHEAD:
        return None
    length, crc = _FRAME.unpack(head)
    if length < _MIN_PAYLOAD or offset + FRAME_OVERHEAD + length > limit:
        return None
    payload = os.pread(fd, length, offset + FRAME_OVERHEAD)
    if len(payload) != length or zlib.crc32(payload, zlib.crc32(head[:4])) != crc:
        return None
    return payload


def _frame_ends(fd: int, size: int, *, verify: bool) -> list[int]:
    """End offsets of the consecutive well-formed frames from the header on. Without ``verify`` only
    the lengths are checked (CRCs are checked when the records are read)."""
    ends, offset = [], HEADER_BYTES
    while offset < size:
        if verify:
            payload = _read_payload(fd, offset, size)
            length = None if payload is None else len(payload)
        else:
            head = os.pread(fd, 4, offset)
            length = _U32.unpack(head)[0] if len(head) == 4 else None
            if length is not None and (length < _MIN_PAYLOAD or offset + FRAME_OVERHEAD + length > size):
                length = None
        if length is None:
            break
        offset += FRAME_OVERHEAD + length
        ends.append(offset)
    return ends


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(directory: Path) -> int:
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SpoolLocked(f"spool directory {directory} is in use by another process (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Spool:
    """Append records, read them in order, commit what was delivered; bounded to ``max_bytes`` on disk."""

    def __init__(
        self, directory: str | Path, *, max_bytes: int, segment_bytes: int = 16 * 1024**2, fsync: bool = False
    ) -> None:
        if max_bytes <= HEADER_BYTES + FRAME_OVERHEAD or segment_bytes <= HEADER_BYTES + FRAME_OVERHEAD:
            raise ValueError("max_bytes and segment_bytes must leave room for a segment header and a record")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.corrupt_records = 0  # torn or corrupt frames found (each loses the rest of its segment)
        self.discarded_bytes = 0  # bytes truncated away or skipped because of them
        self.write_errors = 0  # appends cut short by a failed write (disk full, I/O error)
        self._mutex = threading.Lock()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(self.directory)
        self._segments: dict[int, _Segment] = {}  # in id order
        self._active: _Segment | None = None  # the segment being appended to
        self._write_fd = -1
        self._reader: tuple[int, int] | None = None  # (segment id, fd) of the segment being read
        self._closed = False
        self._recover()

    # -- recovery ---------------------------------------------------------------------------------

    def _recover(self) -> None:
        (self.directory / "cursor.tmp").unlink(missing_ok=True)
        stored = self._load_cursor()
        names = sorted(p for p in self.directory.iterdir() if _SEGMENT_NAME.match(p.name))
        for path in names:
            seg_id = int(path.name[:20])
            if seg_id < stored[0]:
                path.unlink()  # delivered; the crash came between the cursor write and the unlink
                continue
            self._load_segment(seg_id, path, last=path == names[-1])
        self._committed = self._place_cursor(*stored)
        self._read = self._committed
        self._next_id = max([stored[0], *self._segments]) + 1
        self._delete_delivered()

    def _load_cursor(self) -> tuple[int, int]:
        try:
            data = (self.directory / "cursor").read_bytes()
        except FileNotFoundError:
            return 0, HEADER_BYTES
        if len(data) == _CURSOR.size:
            magic, segment, offset, crc = _CURSOR.unpack(data)
            if magic == CURSOR_MAGIC and zlib.crc32(data[:-4]) == crc:
                return segment, offset
        # Written by rename, so this is outside damage: replaying what is left is the safe side.
        log.warning("spool_cursor_invalid", directory=str(self.directory))
        return 0, HEADER_BYTES

    def _load_segment(self, seg_id: int, path: Path, *, last: bool) -> None:
        size = path.stat().st_size
        fd = os.open(path, os.O_RDONLY)
        try:
            header = os.pread(fd, HEADER_BYTES, 0)
            ends = _frame_ends(fd, size, verify=last) if header == SEGMENT_MAGIC else []
        finally:
            os.close(fd)
        if header != SEGMENT_MAGIC and size < HEADER_BYTES and last:
            path.unlink()  # created, header not yet written: it never held a record
            return
        end = ends[-1] if ends else HEADER_BYTES
        segment = _Segment(seg_id, path, size, end, len(ends))
        self._segments[seg_id] = segment
        if header != SEGMENT_MAGIC or end < size:
            self.corrupt_records += 1
            self.discarded_bytes += size - end
            log.warning("spool_corrupt_tail", segment=path.name, offset=end, discarded=size - end)
        if last and header == SEGMENT_MAGIC:
            self._write_fd = os.open(path, os.O_WRONLY)
            os.ftruncate(self._write_fd, end)  # the torn tail goes; appends continue after the last good record
            segment.size = end
            self._active = segment

    def _place_cursor(self, seg_id: int, offset: int) -> Cursor:
        """The stored (segment, offset) with its record index; a position that is not a record boundary
        (outside damage) falls back to the boundary before it: replaying more is the safe side."""
        segment = self._segments.get(seg_id)
        if segment is None:
            return Cursor(seg_id, offset, 0)
        if offset >= segment.end:  # power loss took unsynced records the cursor had passed
            return Cursor(seg_id, segment.end, segment.records)
        with open(segment.path, "rb") as file:
            ends = [HEADER_BYTES, *_frame_ends(file.fileno(), segment.end, verify=False)]
        index = max((i for i, end in enumerate(ends) if end <= offset), default=0)
        return Cursor(seg_id, ends[index], index)

    # -- appending --------------------------------------------------------------------------------

    def append(self, records: Sequence[Mapping[bytes, bytes]]) -> int:
        """Append in order; return how many were accepted: a prefix, short when the next record would
        take the spool over ``max_bytes`` (or a write failed: then ``write_errors`` counts it)."""
        with self._mutex:
            self._check_open()
            chunks: list[bytes] = []
            buffered = accepted = flushed = 0
            try:
                for record in records:
                    frame = encode_frame(record)
                    rotate, need = self._placement(len(frame), buffered)
                    if self.disk_bytes + need > self.max_bytes and not chunks and self._reclaim_active():
                        rotate, need = self._placement(len(frame), buffered)
                    if self.disk_bytes + need > self.max_bytes:
                        break
                    if rotate:
                        self._flush(chunks)
                        flushed, buffered = accepted, 0
                        self._rotate()
                    chunks.append(frame)
                    buffered += len(frame)
                    accepted += 1
                self._flush(chunks)
            except OSError as exc:
                self.write_errors += 1
                log.warning("spool_write_failed", directory=str(self.directory), error=str(exc))
                return flushed
            return accepted

    def _placement(self, frame: int, buffered: int) -> tuple[bool, int]:
        """Whether the frame starts a new segment, and the disk bytes the batch then adds."""
        active = self._active
        rotate = active is None or (
            (active.records > 0 or buffered > 0) and active.size + buffered + frame > self.segment_bytes
        )
        return rotate, buffered + frame + (HEADER_BYTES if rotate else 0)

    def _reclaim_active(self) -> bool:
        """Delete the active segment if everything in it was delivered: without this a spool whose
        max_bytes is below segment_bytes would fill once and never rotate."""
        active = self._active
        if active is None or not self._delivered(active):
            return False
        self._seal_active()
        self._remove(active)
        return True

    def _flush(self, chunks: list[bytes]) -> None:
        """One write of the batch's frames at the end of the active segment; a failed write is undone."""
        active = self._active
        if not chunks or active is None:
            return
        data = b"".join(chunks)
        try:
            _write_all(self._write_fd, data, active.size)
            if self.fsync:
                os.fdatasync(self._write_fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._write_fd, active.size)
            raise
        active.size += len(data)
        active.end = active.size
        active.records += len(chunks)
        chunks.clear()

    def _rotate(self) -> None:
        self._seal_active()
        self._delete_delivered()
        seg_id, self._next_id = self._next_id, self._next_id + 1
        path = self.directory / f"{seg_id:020d}.seg"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, SEGMENT_MAGIC, 0)
            if self.fsync:
                os.fdatasync(fd)
                _fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._write_fd = fd
        self._active = self._segments[seg_id] = _Segment(seg_id, path, HEADER_BYTES, HEADER_BYTES, 0)

    def _seal_active(self) -> None:
        if self._active is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._write_fd, self._active.size)  # drop what a failed write may have left
        os.close(self._write_fd)
        self._write_fd, self._active = -1, None

    # -- reading and committing -------------------------------------------------------------------

    def read(self, max_records: int, max_bytes: int) -> tuple[list[dict[bytes, bytes]], Cursor]:
        """The next records after the read position in append order (at least one if any is pending,
        even when it alone exceeds ``max_bytes``), and the cursor after them to commit once delivered."""
        with self._mutex:
            self._check_open()
            out: list[dict[bytes, bytes]] = []
            size, pos = 0, self._read
            while len(out) < max_records:
                found = self._locate(pos)
                if found is None:
                    break
                segment, at = found
                record = self._record_at(segment, at)
                if record is None:
                    continue  # the rest of that segment is skipped; _locate moves on
                frame, fields = record
                if out and size + frame > max_bytes:
                    break
                out.append(fields)
                size, pos = size + frame, Cursor(segment.id, at.offset + frame, at.index + 1)
            self._read = pos
            return out, pos

    def _locate(self, pos: Cursor) -> tuple[_Segment, Cursor] | None:
        """The segment holding the next record after ``pos``, and that record's position."""
        segment = self._segments.get(pos.segment)
        if segment is not None and pos.index < segment.records:
            return segment, pos
        for seg_id, segment in self._segments.items():
            if seg_id > pos.segment and segment.records > 0:
                return segment, Cursor(seg_id, HEADER_BYTES, 0)
        return None

    def _record_at(self, segment: _Segment, at: Cursor) -> tuple[int, dict[bytes, bytes]] | None:
        payload = _read_payload(self._read_fd(segment), at.offset, segment.end)
        try:
            if payload is not None:
                return FRAME_OVERHEAD + len(payload), decode_record(payload)
        except ValueError:
            pass
        # Corrupt in the middle of a segment: what follows in it cannot be framed, so it is lost.
        self.corrupt_records += 1
        self.discarded_bytes += segment.end - at.offset
        log.warning("spool_corrupt_record", segment=segment.path.name, offset=at.offset)
        segment.end, segment.records = at.offset, at.index
        if segment is self._active:
            self._seal_active()  # new appends go to a fresh segment
        return None

    def _read_fd(self, segment: _Segment) -> int:
        if self._reader is None or self._reader[0] != segment.id:
            self._close_reader()
            self._reader = (segment.id, os.open(segment.path, os.O_RDONLY))
        return self._reader[1]

    def _close_reader(self) -> None:
        if self._reader is not None:
            os.close(self._reader[1])
            self._reader = None

    def commit(self, cursor: Cursor) -> None:
        """Durably mark everything up to ``cursor`` (from ``read``) as delivered and delete segments
        left wholly behind it. Committing an older cursor again is a no-op."""
        with self._mutex:
            self._check_open()
            if cursor <= self._committed:
                return
            if cursor > self._read:
                raise ValueError(f"cannot commit {cursor}: beyond the read position {self._read}")
            body = struct.pack("<8sQQ", CURSOR_MAGIC, cursor.segment, cursor.offset)
            tmp = self.directory / "cursor.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(fd, body + _U32.pack(zlib.crc32(body)), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.directory / "cursor")
            _fsync_dir(self.directory)
            self._committed = cursor
            self._delete_delivered()

    def rewind(self) -> None:
        """Move the read position back to the committed cursor (after a failed send)."""
        with self._mutex:
            self._read = self._committed

    def _delivered(self, segment: _Segment) -> bool:
        committed = self._committed
        return (
            segment.id < committed.segment
            or (segment.id == committed.segment and committed.index >= segment.records)
            or segment.records == 0
        )

    def _delete_delivered(self) -> None:
        for segment in list(self._segments.values()):
            if segment is not self._active and self._delivered(segment):
                self._remove(segment)

    def _remove(self, segment: _Segment) -> None:
        if self._reader is not None and self._reader[0] == segment.id:
            self._close_reader()
        segment.path.unlink(missing_ok=True)
        del self._segments[segment.id]

    # -- state ------------------------------------------------------------------------------------

    @property
    def committed(self) -> Cursor:
        return self._committed

    @property
    def pending_records(self) -> int:
        """Records appended and not yet committed (read or not)."""
        c = self._committed
        return sum(max(0, s.records - (c.index if s.id == c.segment else 0)) for s in self._live_segments())

    @property
    def pending_bytes(self) -> int:
        """Frame bytes of the records appended and not yet committed."""
        c = self._committed
        return sum(max(0, s.end - (c.offset if s.id == c.segment else HEADER_BYTES)) for s in self._live_segments())

    def _live_segments(self) -> list[_Segment]:
        return [s for s in self._segments.values() if s.id >= self._committed.segment]

    @property
    def disk_bytes(self) -> int:
        """Bytes of all segment files, delivered-but-not-yet-deleted ones included (bounded by max_bytes)."""
        return sum(s.size for s in self._segments.values())

    @property
    def segments(self) -> int:
        return len(self._segments)

    # -- lifecycle --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"spool {self.directory} is closed")

    def close(self) -> None:
        """Close the files and release the directory lock; appended records stay for the next open."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            self._seal_active()
            self._close_reader()
            os.close(self._lock_fd)

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
