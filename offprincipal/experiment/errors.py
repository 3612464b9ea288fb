"""Errors of the experiment layer."""


class UsageError(Exception):
    """A user error (a bad option value, a missing path, an existing output folder): its message names the option
    and what to do; the command line prints it as one line and exits with status 2."""
