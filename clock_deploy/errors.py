"""Errors caused by the user's input (files, configs, options).

The CLI prints them as one clear line instead of a traceback.
"""


class UserError(Exception):
    """Bad input: the message says what is wrong and where (file:line, config key, option)."""


def one_line(error):
    """A failure as one report line: a UserError's message, else the exception type and its first line."""
    text = str(error).strip().splitlines()
    return text[0] if isinstance(error, UserError) and text else f"{type(error).__name__}: {text[0] if text else ''}"
