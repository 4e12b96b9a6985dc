"""Errors caused by the user's input (files, configs, options).

The CLI prints them as one clear line instead of a traceback.
"""


class UserError(Exception):
    """Bad input: the message says what is wrong and where (file:line, config key, option)."""
