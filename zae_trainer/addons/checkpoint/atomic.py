"""Atomic publication of files and folders: a reader sees the old version or the new one, never half.

Every write goes to a temporary name in the destination's own folder (so the final
``os.replace`` / ``os.rename`` stays on one file system and is atomic), is flushed and
``fsync``-ed, and only then renamed into place; the folder is ``fsync``-ed so the rename
itself survives a power cut. Temporary names carry :data:`TEMP_MARK` and the writer's pid:
nothing that lists checkpoints ever picks them up, and :func:`remove_stale_temps` clears the
ones a killed process left behind.

Deletion is the same in reverse: :func:`mark_for_deletion` renames a checkpoint to a hidden
name ending in :data:`DELETE_MARK` (one atomic rename, so nothing ever sees half a
checkpoint under its real name), then the slow part (removing a large file or folder)
follows. Whoever finds a marked name finishes the job (:func:`finish_deletions`), so a
deletion cut short by a crash or a kill is completed by the next trainer in that folder.

:func:`link_atomic` points a fixed name (``best``, ``last``) at a checkpoint by replacing a
symbolic link in one rename, so the name always resolves to a complete checkpoint.
"""

from __future__ import annotations

import errno
import itertools
import os
import secrets
import shutil
from typing import IO, Any, Callable

from .errors import CheckpointWriteError

__all__ = [
    "TEMP_MARK",
    "is_temp_name",
    "write_file_atomic",
    "write_path_atomic",
    "publish_dir_atomic",
    "remove_stale_temps",
    "fsync_dir",
    "DELETE_MARK",
    "mark_for_deletion",
    "finish_deletions",
    "remove_path",
    "link_atomic",
]

TEMP_MARK = ".zt-tmp-"


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is an unfinished write (never a checkpoint)."""
    return TEMP_MARK in name


#: what makes temporary names unique: the writer's pid (which :func:`remove_stale_temps`
#: reads back), a random token drawn once per process (a later process given a dead one's
#: pid does not meet its leftovers) and a counter (drawing a token per name cost ~16,000
#: instructions, a fifth of what a checkpoint's links and manifest cost to write)
_PROCESS_TOKEN = secrets.token_hex(4)
_sequence = itertools.count()


def _temp_name(final: str) -> str:
    folder, base = os.path.split(final)
    return os.path.join(folder, f".{base}{TEMP_MARK}{os.getpid()}-{_PROCESS_TOKEN}{next(_sequence)}")


def fsync_dir(folder: str) -> None:
    """Make renames inside ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RecordingFile:
    """A binary file whose ``write`` remembers the first ``OSError``.

    ``torch.save`` turns a failed ``write`` into a generic ``RuntimeError``; keeping the
    original error lets us say *why* (disk full, file-size limit) instead of "write failed".
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.error: OSError | None = None
        self.written = 0

    def write(self, data: Any) -> int:
        try:
            n = self._raw.write(data)
        except OSError as exc:
            if self.error is None:
                self.error = exc
            raise
        self.written += n if n is not None else len(data)
        return n

    def flush(self) -> None:
        self._raw.flush()

    def tell(self) -> int:
        return self._raw.tell()

    def seek(self, *args: Any) -> int:
        return self._raw.seek(*args)

    def fileno(self) -> int:
        return self._raw.fileno()


def _explain(exc: BaseException, target: str, recorded: OSError | None) -> CheckpointWriteError:
    cause = recorded or (exc if isinstance(exc, OSError) else None)
    code = getattr(cause, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        why = (
            "the disk is full or a file-size limit was reached (ENOSPC/EDQUOT: free some space or choose "
            "another save_path; EFBIG: raise the limit shown by `ulimit -f`)"
        )
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "the folder is not writable; choose a save_path you can write to"
    else:
        why = f"{type(cause or exc).__name__}: {cause or exc}"
    return CheckpointWriteError(
        f"could not write checkpoint {target!r}: {why}. The temporary file was removed and earlier "
        "checkpoints are untouched.",
        target,
    )


def write_path_atomic(final: str, write: Callable[[str], object]) -> int:
    """Like :func:`write_file_atomic` for writers that take a path (``torch.save``'s fast C++ writer).

    Such writers report a failed write without its ``errno``; :func:`_diagnose` finds the
    cause (file-size limit, full disk) from the temporary file before it is removed.
    """
    tmp = _temp_name(final)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        size = os.path.getsize(tmp)
        os.replace(tmp, final)
    except BaseException as exc:
        cause = (_reported_errno(exc) or _diagnose(tmp)) if isinstance(exc, Exception) else None
        _remove_quietly(tmp)
        if isinstance(exc, Exception):
            raise _explain(exc, final, cause) from exc
        raise
    fsync_dir(os.path.dirname(os.path.abspath(final)))
    return size


def _reported_errno(exc: BaseException) -> OSError | None:
    """The OS error a library reported only in its message (safetensors: "... (os error 28)")."""
    import re

    found = re.search(r"os error (\d+)", str(exc))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


def _diagnose(tmp: str) -> OSError | None:
    """Why a write into ``tmp`` failed, when the writer did not say: EFBIG or ENOSPC, else None."""
    import resource

    try:
        size = os.path.getsize(tmp)
    except OSError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and size >= soft - (1 << 16):
        return OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    if shutil.disk_usage(os.path.dirname(os.path.abspath(tmp))).free < (1 << 20):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def write_file_atomic(final: str, write: Callable[[RecordingFile], object]) -> int:
    """Write ``final`` through ``write(file)`` atomically; returns the number of bytes written.

    Raises
    ------
    CheckpointWriteError
        If anything fails; the temporary file is removed and ``final`` is left as it was.
    """
    tmp = _temp_name(final)
    recorder: RecordingFile | None = None
    try:
        with open(tmp, "wb") as raw:
            recorder = RecordingFile(raw)
            write(recorder)
            raw.flush()
            os.fsync(raw.fileno())
        size = os.path.getsize(tmp)
        os.replace(tmp, final)
    except BaseException as exc:
        _remove_quietly(tmp)
        if isinstance(exc, Exception):
            raise _explain(exc, final, recorder.error if recorder else None) from exc
        raise
    fsync_dir(os.path.dirname(os.path.abspath(final)))
    return size


def publish_dir_atomic(final: str, fill: Callable[[str], None]) -> None:
    """Create the folder ``final`` by filling a temporary folder and renaming it into place.

    ``fill(tmp_dir)`` writes the files; each is ``fsync``-ed before the rename. ``final``
    must not exist yet (checkpoint names are unique), so the rename is atomic.
    """
    tmp = _temp_name(final)
    try:
        os.mkdir(tmp)
        fill(tmp)
        for name in os.listdir(tmp):
            fd = os.open(os.path.join(tmp, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(tmp)
        os.rename(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, CheckpointWriteError):
            raise CheckpointWriteError(str(exc).replace(repr(exc.path), repr(final)), final) from exc
        if isinstance(exc, Exception):
            raise _explain(exc, final, None) from exc
        raise
    fsync_dir(os.path.dirname(os.path.abspath(final)))


def remove_stale_temps(folder: str) -> list[str]:
    """Delete temporary files and folders whose writer process is gone; return their names."""
    removed: list[str] = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for name in names:
        if not is_temp_name(name):
            continue
        pid_text = name.rsplit(TEMP_MARK, 1)[1].split("-", 1)[0]
        if pid_text.isdigit() and _alive(int(pid_text)):
            continue
        remove_path(os.path.join(folder, name))
        removed.append(name)
    return removed


DELETE_MARK = ".deleting"


def remove_path(path: str) -> None:
    """Remove a file, a symbolic link or a folder tree; nothing there is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
        if os.path.exists(path):  # what ignore_errors left behind: say so rather than pretend
            shutil.rmtree(path)
    else:
        _remove_quietly(path)


def mark_for_deletion(path: str) -> str:
    """Rename ``path`` to a hidden name ending in :data:`DELETE_MARK`; return the new path.

    The rename is atomic and durable (the folder is fsync-ed), so from now on no reader
    finds the checkpoint under its name, and any process may finish removing it.
    """
    folder, base = os.path.split(path)
    marked = os.path.join(folder, f".{base}{DELETE_MARK}")
    if os.path.lexists(marked):
        marked = os.path.join(folder, f".{base}-{secrets.token_hex(4)}{DELETE_MARK}")
    try:
        os.rename(path, marked)
    except FileNotFoundError:
        return marked
    fsync_dir(folder or ".")
    return marked


def finish_deletions(folder: str) -> list[str]:
    """Remove every marked (half-deleted) checkpoint in ``folder``; return the original names."""
    done: list[str] = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return done
    for name in names:
        if name.startswith(".") and name.endswith(DELETE_MARK):
            remove_path(os.path.join(folder, name))
            done.append(name[1: -len(DELETE_MARK)])
    return done


def link_atomic(link: str, target_name: str, *, durable: bool = True) -> None:
    """Make ``link`` a symbolic link to ``target_name`` (relative, in the same folder), atomically.

    ``durable=False`` leaves the folder's ``fsync`` to the caller (one for several links).
    """
    tmp = _temp_name(link)
    os.symlink(target_name, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        _remove_quietly(tmp)
        raise
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(link)))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
