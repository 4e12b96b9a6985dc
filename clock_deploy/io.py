"""Atomic file writes: a crash never leaves a half-written checkpoint or report.

A write goes to `<name>.<pid>-<random>.tmp` next to the target, is fsynced and renamed onto
it. The file gets the usual permissions (0666 minus the umask, e.g. 0644), so artifacts can be
copied to another machine and read there. A temporary file left by a killed process (its pid
is gone) is removed the next time the same target is written.
"""
import contextlib
import errno
import glob
import hashlib
import json
import os
import pickle
import secrets
import shutil
import warnings

from clock_deploy.errors import UserError


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _remove_stale_tmp(path):
    """Delete `<path>.<pid>-*.tmp` files whose writer process no longer exists."""
    for tmp in glob.glob(glob.escape(path) + ".*-*.tmp"):
        pid = tmp[len(path) + 1:].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(tmp)


def remove_stale_folders(parent, prefix):
    """Delete `<parent>/<prefix><pid>-*` folders whose process is gone (left by a kill -9)."""
    for folder in glob.glob(os.path.join(glob.escape(parent), glob.escape(prefix) + "*-*")):
        pid = os.path.basename(folder)[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def is_inside(path, folder):
    """Whether `path` (after resolving symlinks) is `folder` or below it."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_inside(root, *folders):
    """Refuse to write through a symlinked folder that leads out of the output root `root`: a writer
    that deletes stale files or replaces files there would touch data that is not its own."""
    for folder in folders:
        if os.path.lexists(folder) and not is_inside(folder, root):
            raise UserError(f"{folder} leads outside the output folder {root} (a symlink to "
                            f"{os.path.realpath(folder)}); refusing to write through it")


def plain_file_name(name, flag):
    """`name` as a bare file name (no folder separators, no '..', not absolute), else a UserError naming `flag`."""
    bad = (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
           or os.path.isabs(name) or (os.altsep and os.altsep in name))
    if bad:
        raise UserError(f"{flag} must be a plain file name (no folders, '..' or absolute path), got {name!r}")
    return name


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder):
    """Make a rename durable; best effort, as some systems cannot open or sync a folder."""
    with contextlib.suppress(OSError):
        _fsync(folder)


def write_error(path, e):
    """UserError for a failed write of `path` (permission denied, disk full, ...)."""
    code = getattr(e, "errno", None)
    if code in (errno.EEXIST, errno.ENOTDIR):  # makedirs through a file
        reason = "a part of its folder path is a file, not a folder"
    else:
        reason = (e.strerror if isinstance(e, OSError) and e.strerror
                  else str(e).splitlines()[0] if str(e) else type(e).__name__)
    hint = " (is the disk full?)" if code == errno.ENOSPC else ""
    return UserError(f"cannot write {path}: {reason}{hint}")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; fsync it and rename it onto `path` only if the block
    succeeds. OS errors (unwritable folder, disk full) become a UserError naming `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        os.makedirs(folder, exist_ok=True)
        _remove_stale_tmp(path)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode follows the umask
    except OSError as e:
        raise write_error(path, e) from None
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync_folder(folder)
    except OSError as e:
        if e.filename not in (None, tmp, path, folder):  # the block failed on another file: not ours to word
            raise
        raise write_error(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def write_json(path, data):
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


class _RecordingWriter:
    """A file for torch.save that remembers the OS error of a failed write: torch reports it as its own
    RuntimeError ("[enforce fail at inline_container.cc] ... unexpected pos"), which names no cause."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        self.file.flush()


def torch_save(obj, path):
    """torch.save, atomically; a failed write (disk full, I/O error) is a UserError and the old file stays."""
    import torch  # torch-free: io.py sits below the runtime, which loads ONNX / engines without torch

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            writer = _RecordingWriter(f)
            try:
                torch.save(obj, writer)
                f.flush()
            except (RuntimeError, OSError) as e:
                if writer.error is not None:
                    raise write_error(path, writer.error) from None
                if isinstance(e, OSError) or "write" in str(e) or "inline_container" in str(e):
                    raise UserError(f"cannot write {path}: writing the checkpoint failed (is the disk full?)") from None
                raise


def torch_load(path, what="PyTorch checkpoint", allowed=(), map_location="cpu"):
    """torch.load(path, weights_only=True) with the project's one line for a file it cannot read.

    torch's own message for a pickle holding other objects advises re-running with
    weights_only=False, which runs code from the file: never passed on. allowed: classes the
    file may hold besides tensors and plain containers (torch.serialization.safe_globals)."""
    import torch  # torch-free: io.py sits below the runtime, which loads ONNX / engines without torch


    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path}: not a readable {what} (empty file)")
    try:
        with torch.serialization.safe_globals(list(allowed)), warnings.catch_warnings():
            # garbage that starts like a pickle: torch warns about the protocol before it fails
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e) and "weights_only" not in str(e):  # not a class reference
            raise UserError(f"{path}: not a readable {what} (corrupt data)") from None
        raise UserError(f"{path}: not a readable {what} (it holds Python objects other than tensors and plain "
                        "containers; refused because loading them could run code)") from None
    except Exception as e:  # not a torch file, truncated zip, folder ...
        lines = [line.strip() for line in str(e).splitlines() if line.strip() and "weights_only" not in line]
        reason = f"{type(e).__name__}: {lines[0].split('. ')[0][:200]}" if lines else type(e).__name__
        raise UserError(f"{path}: not a readable {what} ({reason})") from None


def file_sha256(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path):
    """Parse a JSON file; a missing, binary or malformed file is a UserError naming it (and the line)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, expected a JSON file") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except (UnicodeDecodeError, RecursionError):
        raise UserError(f"{path}: not valid JSON (not a text file or nested too deeply)") from None
