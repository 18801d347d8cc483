"""Exceptions that mean "the user can fix this": the CLI prints them as one line, no traceback."""
from __future__ import annotations


class ClipfusionError(Exception):
    """Base class of every error caused by input or configuration rather than by a bug."""


class SettingError(ClipfusionError, ValueError):
    """A method setting has a value it cannot take (names the setting and the allowed values)."""


class DatasetError(ClipfusionError):
    """A dataset folder, index file or ground-truth mask is missing or inconsistent."""


class MemoryBankMismatchError(ClipfusionError):
    """A saved memory bank was made with settings other than the detector's."""


class WeightsNotFoundError(ClipfusionError):
    """Model weights are neither in the local cache nor reachable (names the model and both fixes)."""


class ImageReadError(ClipfusionError):
    """One image file could not be read; runs report it and go on with the other images."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


class ImageTooLargeError(ImageReadError):
    """An image above the pixel limit (refused before its pixels are decoded)."""
