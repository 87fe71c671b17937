"""The errors users see: one clear line, no traceback."""


class LmcxError(Exception):
    """Bad input (config, file, argument): the CLI prints `error: <message>` and exits with code 2.

    Messages name what is wrong and how to fix it, in one line.
    """

    exit_code = 2


class RunFailed(LmcxError):
    """The inputs were valid but the computation failed (e.g. training diverged): exit code 1."""

    exit_code = 1


# Exit codes besides LmcxError's: a step skipped because another process holds its directory is not a
# success (`lmcx train && lmcx match` must stop), nor bad input; 128 + signal number for SIGTERM, as shells do.
BUSY_EXIT_CODE = 3
INTERRUPTED_EXIT_CODE = 130  # Ctrl-C
TERMINATED_EXIT_CODE = 143  # SIGTERM
