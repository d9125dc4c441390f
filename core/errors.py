"""Exceptions the engine raises, each carrying a message a user can act on."""
from __future__ import annotations


class OkngError(Exception):
    """Base class: every error the station reports to a user derives from it."""


class ImageLoadError(OkngError):
    """An image could not be read. The message names the file and the reason."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class ModelFileError(OkngError):
    """A model file is missing, damaged, from another version, or not a model at all."""


class BackboneUnavailableError(OkngError):
    """The requested backbone's weights cannot be had (offline, unknown name, bad file)."""


class NotFittedError(OkngError):
    """The detector has no normality model yet: fit it on OK images first."""


class Cancelled(OkngError):
    """A job stopped because its cancel token was set."""


class ResourceError(OkngError):
    """The work would need more memory (or another resource) than the machine has."""
