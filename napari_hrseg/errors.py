"""The project's exceptions: every failure a user can cause ends in one of these.

Each error names *what* (the file or object), *the problem*, and *what to do*, so the message alone is
enough for a pathologist at the viewer or an engineer reading a CLI log.  Code that catches a third-party
exception (tifffile, zarr, pydicom, torch) re-raises it as one of these with ``raise ... from exc`` so the
original traceback stays available for debugging.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "HrsegError",
    "SlideError",
    "UnsupportedFormatError",
    "CorruptSlideError",
    "RegionError",
    "ModelError",
    "UnknownModelError",
    "UnsafeCheckpointError",
    "IncompatibleModelError",
    "LabelStoreError",
    "ExportError",
    "ImportAnnotationsError",
    "TrainingError",
    "Cancelled",
]


class HrsegError(Exception):
    """Base class of every error napari-hrseg raises on purpose.

    Parameters
    ----------
    problem : str
        What went wrong, in one sentence.
    subject : str or Path, optional
        The file, model or object the problem is about; printed first.
    hint : str, optional
        What the user can do about it.
    """

    def __init__(self, problem: str, *, subject: str | Path | None = None, hint: str | None = None):
        self.problem = problem
        self.subject = None if subject is None else str(subject)
        self.hint = hint
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """The one-line message: ``subject: problem. hint``."""
        text = self.problem.rstrip(".")
        if self.subject:
            text = f"{self.subject}: {text}"
        text += "."
        if self.hint:
            text += f" {self.hint.rstrip('.')}."
        return text

    def __str__(self) -> str:  # keep str() stable even if args are changed by pickling
        return self.message

    def __reduce__(self):
        # Errors cross process boundaries (dask workers); keep subject and hint when pickled.
        return (_rebuild_error, (type(self), self.problem, self.subject, self.hint))


def _rebuild_error(cls, problem, subject, hint):
    return cls(problem, subject=subject, hint=hint)


class SlideError(HrsegError):
    """A slide or image could not be opened or read."""


class UnsupportedFormatError(SlideError):
    """The path is not an image format napari-hrseg reads (or not an image at all)."""


class CorruptSlideError(SlideError):
    """The file claims a supported format but its content is broken (truncated, missing chunks, bad frames)."""


class RegionError(HrsegError):
    """A region is empty, outside the slide, or otherwise unusable."""


class ModelError(HrsegError):
    """A model could not be built, loaded or applied."""


class UnknownModelError(ModelError, KeyError):
    """A model or architecture name that is not registered."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.message


class UnsafeCheckpointError(ModelError):
    """A checkpoint would need code execution (a pickle payload) to load; it is refused."""


class IncompatibleModelError(ModelError):
    """A model does not fit the data: channels, classes or pixel size disagree."""


class LabelStoreError(HrsegError):
    """A label store could not be created, opened, written or repaired."""


class ExportError(HrsegError):
    """Labels could not be exported."""


class ImportAnnotationsError(HrsegError):
    """Annotations (e.g. a QuPath GeoJSON) could not be imported."""


class TrainingError(HrsegError):
    """Training or fine-tuning could not start or failed."""


class Cancelled(HrsegError):
    """Long work was cancelled by the user; nothing half-done was presented as done."""
