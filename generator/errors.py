"""Error types of the generator library.

Every error a user can cause (a bad checkpoint, a bad input, a missing opt-in) is a `LoragenError`, whose
message says what is wrong and how to fix it. The CLI prints it as one line; the service maps it to a 4xx.
Anything else escaping the library is a bug.
"""


class LoragenError(Exception):
    """Base class: a problem the caller can fix; the message names the fix."""


class ConfigError(LoragenError, ValueError):
    """An architecture config that cannot describe a valid hypernetwork."""


class CheckpointError(LoragenError):
    """A checkpoint that is missing, corrupt, hostile or does not match its config."""


class EncoderError(LoragenError):
    """A task encoder that cannot be loaded, or an input it cannot encode."""


class InputError(LoragenError, ValueError):
    """A task description, document or embedding that cannot be turned into an adapter."""


class DocumentTooLarge(InputError):
    """A document with more tokens than the server takes (413): the message names the limit."""
