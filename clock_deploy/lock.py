"""One writer per output folder: a lock file naming its owner (pid, host, command).

    with output_lock("runs/teacher", "train"):
        ...  # a second train / distill / export / bench into runs/teacher refuses with one line

The file `<folder>/.clock-deploy.lock` is held with flock, so the kernel releases it when its owner
dies, even by kill -9; its JSON content names the owner for the refusal message. A lock left by a
dead process on this host is taken over with a warning; one written on another host (a shared
folder, where flock may not reach across machines) is refused, naming the host, since its owner
cannot be checked from here. Nested locks of one folder in one process are allowed (a pipeline
stage calling the library). Bottom layer: no torch.
"""
import contextlib
import fcntl
import json
import logging
import os
import socket
import time

from clock_deploy.errors import UserError
from clock_deploy.io import pid_alive, write_error

log = logging.getLogger(__name__)
LOCK_NAME = ".clock-deploy.lock"
_held = {}  # real path of a lock file -> how many times this process holds it


def lock_path(folder):
    return os.path.join(os.fspath(folder), LOCK_NAME)


def _owner(command):
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read_owner(fd):
    """The JSON the holder wrote, {} when empty or unreadable (a holder killed while writing it)."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        data = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
    except (UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe(owner):
    return (f"`{owner.get('command', '?')}` (pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, "
            f"started {owner.get('started', '?')})")


def _open_locked(path):
    """fd of `path` holding its flock, or (None, owner) when a live process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # never truncate a link's target
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            return None, owner
        # the previous holder may have removed the file between our open and flock: lock the file that is there
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, None
        os.close(fd)


def acquire(folder, command):
    """Take the lock of `folder` (created if missing); returns its fd. UserError when another process holds it."""
    folder = os.fspath(folder)
    path = lock_path(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise write_error(folder, e) from None
    try:
        fd, holder = _open_locked(path)
    except OSError as e:
        raise write_error(path, e) from None
    if fd is None:
        raise UserError(f"{folder} is being written by {describe(holder)}; wait for it to finish or choose "
                        f"another output folder (lock file {path})")
    stale = _read_owner(fd)
    here = socket.gethostname()
    if stale.get("host") not in (None, here):
        os.close(fd)
        raise UserError(f"{folder} is locked by {describe(stale)}, a process on another host that cannot be "
                        f"checked from here; if that run is gone, delete {path}")
    if stale.get("pid") is not None and stale["pid"] != os.getpid():
        alive = " (its pid now belongs to another process)" if pid_alive(stale["pid"]) else ""
        log.warning(f"{folder}: taking over the lock of {describe(stale)}, which ended without releasing "
                    f"it{alive}")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(_owner(command)) + "\n").encode())
    return fd


def release(folder, fd):
    """Remove the lock file while still holding it, then let it go."""
    with contextlib.suppress(OSError):
        os.remove(lock_path(folder))
    os.close(fd)


@contextlib.contextmanager
def output_lock(folder, command):
    """Hold the lock of `folder` for the block (re-entrant within one process)."""
    key = os.path.realpath(lock_path(folder))
    if _held.get(key):
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    fd = acquire(folder, command)
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        release(folder, fd)
