"""Exception types the user can act on.

Every error the library raises on purpose derives from ``ImagegenError``; the CLI prints its
message as one line (no traceback) and the HTTP layer maps it to a 4xx JSON body. The message
must say what was wrong *and* what to do about it.
"""


class ImagegenError(Exception):
    """Base class of the errors a user can fix."""

    #: machine-readable code for the HTTP error body
    code = "imagegen_error"
    #: the request field the error is about, when there is one
    field: str | None = None

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        if field is not None:
            self.field = field


class ConfigError(ImagegenError):
    """A configuration file or setting is wrong."""

    code = "config_error"


class UnknownPresetError(ImagegenError):
    """A preset name that configs/models.yaml does not define."""

    code = "unknown_preset"
    field = "preset"


class InvalidRequestError(ImagegenError):
    """A render request with a value out of range (size, steps, guidance...)."""

    code = "invalid_request"


class ModelNotAvailableError(ImagegenError):
    """Weights are missing locally and cannot be downloaded."""

    code = "model_not_available"


class UnsafeCheckpointError(ImagegenError):
    """A pickle checkpoint was offered where only safetensors are accepted."""

    code = "unsafe_checkpoint"


class BadOutputError(ImagegenError):
    """The pipeline produced NaN or all-black images."""

    code = "bad_output"
