"""The one exception type for bad input; its message names the input and the problem."""

import errno


class CoreMergeError(ValueError):
    """Bad user input: an adapter that cannot be read or merged, or an invalid option.

    The CLI prints the message as one line and exits with code 2; the app shows it as `gr.Error`.
    """


class AdapterFormatError(CoreMergeError):
    """An adapter file or config that is missing, malformed or not a plain LoRA."""


class IncompatibleAdaptersError(CoreMergeError):
    """Adapters that cannot be merged together (different base models or module shapes)."""


class HubError(CoreMergeError):
    """A Hub ID that does not exist or cannot be reached."""


class OutputError(CoreMergeError):
    """An output that cannot be written: an --output location that cannot be used or holds files coremerge
    did not write, or merged values beyond the range of the written dtype."""


def shown(text: object) -> str:
    """Text fit for one terminal line: control characters (escape sequences, newlines) escaped."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(text))


def describe_os_error(error: OSError) -> str:
    """`permission denied`, `read-only file system`, ... without the path (the caller names the input)."""
    if isinstance(error, PermissionError) or error.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return (error.strerror or type(error).__name__).lower()
