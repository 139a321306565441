"""One writer per output folder.

Two merges into the same OUT would share the hidden `.OUT.partial` staging folder: the second
would discard or resume the first's half-written shards while the first is still writing them.
So a merge holds an exclusive `flock` on `.OUT.lock` beside the staging folder, from before it
touches that folder until it has published or given up. The kernel drops the lock when the
process ends, however it ends, so a merge killed with SIGKILL never blocks the next one; the
file's text (pid, host, start time) only serves the message of a refused merge.

The file is removed when the lock is released, which needs care: a second process may have
opened the file just before the holder removed it and then get the lock on an inode no longer
reachable by name, while a third creates a new file and locks that. So the holder removes the
file while still holding the lock, and whoever gets the lock checks that the path still names
the file it locked, starting over if not. Only a SIGKILL leaves the (hidden, tiny) file behind,
and the next merge simply takes it over.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from mergesmith.errors import MergeError

try:
    import fcntl
except ImportError:  # not POSIX: no lock, as before
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("mergesmith")

# Someone may hold the lock for an instant without merging (`validate --out` peeking, a
# holder writing its pid): look again for this long before refusing.
BUSY_RETRY_SECONDS = 0.25
_RETRY_STEP = 0.05


def lock_path(out: Path) -> Path:
    """Beside the staging folder, hidden, and a file: it can never pass for a model."""
    return out.parent / f".{out.name}.lock"


class WriterLock:
    """The exclusive right to write `out`; release with `release()` or a `with` block."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path = path
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file, then unlock; idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Removed while still locked: see the module's docstring.
            if _names(self.path, fd):
                self.path.unlink()
        except OSError:
            pass  # a file left behind is harmless: the next merge takes it over
        finally:
            os.close(fd)

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def lock_output(out: Path) -> WriterLock:
    """Take the writer lock for `out`, or raise MergeError naming the merge that holds it.

    Creates `out`'s parent folder if needed (the staging folder goes there next)."""
    path = lock_path(out)
    if fcntl is None:
        return WriterLock(path, None)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MergeError(
            f"cannot create the output's folder '{path.parent}': {exc.strerror}",
            "choose an output path in a folder you can write to",
        ) from None
    deadline = time.monotonic() + BUSY_RETRY_SECONDS
    while True:
        fd = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(_RETRY_STEP)
                continue
            raise MergeError(
                f"another merge is writing '{out}' ({holder})",
                "wait for it to finish, or stop it and continue its work with --resume",
            ) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            log.warning(
                "cannot lock %s on this file system (%s); make sure no other merge writes to '%s'",
                path,
                exc.strerror,
                out,
            )
            return WriterLock(path, None)
        if _names(path, fd):
            break
        # The file was removed (and maybe replaced) by a holder that finished meanwhile.
        os.close(fd)
    _record_holder(fd)
    return WriterLock(path, fd)


def running_merge(out: Path) -> str | None:
    """Who is writing `out` right now ('pid 123 on host h, since ...'), or None.

    Peeks with a shared lock held for an instant, so it never blocks a merge for longer than
    the merge's own retry covers."""
    path = lock_path(out)
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd)
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:
        pass  # another user's lock file: a read-only descriptor can still be locked
    except OSError as exc:
        raise _cannot_create(path, exc) from None
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise _cannot_create(path, exc) from None


def _cannot_create(path: Path, exc: OSError) -> MergeError:
    return MergeError(
        f"cannot create the lock file '{path}': {exc.strerror}",
        "choose an output path in a folder you can write to",
    )


def _names(path: Path, fd: int) -> bool:
    """Whether `path` still names the open file `fd`."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _record_holder(fd: int) -> None:
    text = json.dumps(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    )
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (text + "\n").encode(), 0)
    except OSError:
        pass  # a read-only descriptor or a full disk: the lock holds, the message lacks the pid


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        described = f"pid {int(info['pid'])}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not recorded its pid yet"
    if info.get("host"):
        described += f" on {info['host']}"
    if info.get("started"):
        described += f", since {info['started']}"
    return described
