"""heron's command line (`heron <command>`, `python -m heron <command>`); the parser is in main."""


class UsageError(ValueError):
    """Bad command-line input: `heron` prints it as one line and exits with status 2, before loading data."""
