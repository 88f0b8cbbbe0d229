"""The one exception type for bad input; its message names the input and the problem."""


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
