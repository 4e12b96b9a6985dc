"""Atomic file writes: a crash never leaves a half-written checkpoint or report."""
import contextlib
import json
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def write_json(path, data):
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def torch_save(obj, path):
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_json(path):
    """Parse a JSON file; a missing, binary or malformed file is a UserError naming it (and the line)."""
    from clock_deploy.errors import UserError

    path = os.fspath(path)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid JSON (not a text file)") from None
