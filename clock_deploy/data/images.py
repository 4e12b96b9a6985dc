"""Reading image files: every way a file can fail to be an image becomes one UserError naming it.

Torch-free (the runtime uses it). PIL reports broken files with many exception types
(OSError for truncated data, SyntaxError / ValueError / struct.error for corrupt headers,
DecompressionBombError for absurd sizes), so they are all caught here and nowhere else.
"""
import os
import struct

from PIL import Image

from clock_deploy.errors import UserError

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


def _error(path, e):
    if isinstance(e, FileNotFoundError):
        return UserError(f"image not found: {path}")
    if isinstance(e, IsADirectoryError):
        return UserError(f"{path}: is a folder, expected an image")
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return UserError(f"{path}: cannot read image ({reason})")


def image_size(path, verify=False):
    """(height, width) of an image file, from its header only; with `verify`, the whole file is
    also checked (PNG chunk CRCs, truncation) without decoding the pixels."""
    path = os.fspath(path)
    try:
        with Image.open(path) as image:
            if verify:
                image.verify()
            return image.height, image.width
    except _DECODE_ERRORS as e:
        raise _error(path, e) from None


def read_rgb(path):
    """The fully decoded RGB PIL image of a file (a truncated file is an error, not gray pixels)."""
    path = os.fspath(path)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except _DECODE_ERRORS as e:
        raise _error(path, e) from None
