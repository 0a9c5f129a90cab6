"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class StagError(Exception):
    """Bad input or an unusable checkpoint, explained in one line."""
