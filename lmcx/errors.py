"""The one error type users see: a clear line, exit code 2, no traceback."""


class LmcxError(Exception):
    """Bad input (config, file, argument). The CLI prints `error: <message>` and exits with code 2.

    Messages name what is wrong and how to fix it, in one line.
    """
