"""Every exception hubmerge raises on purpose, in one place.

Each class maps to one kind of failure a user can act on; the CLI turns them into one line and an exit
code (``exit_code``): 2 = bad usage, 3 = bad input (models, data, files), 4 = remote failure.
"""

from __future__ import annotations


class HubmergeError(Exception):
    """Base class: a failure with a message that says what went wrong and how to fix it."""

    exit_code = 3


class UsageError(HubmergeError):
    """An option or argument is out of range or inconsistent with another."""

    exit_code = 2


class UnsupportedModelError(HubmergeError):
    """The model cannot be traced into an exact permutation spec, or timm cannot rebuild it."""


class IncompatibleModelsError(HubmergeError):
    """The two endpoints cannot be merged (different architectures, widths or class counts)."""


class DataError(HubmergeError):
    """Calibration or evaluation data is empty, malformed, or lacks a needed column."""


class CheckpointError(HubmergeError):
    """A saved model is missing, tampered with, or in a format hubmerge refuses to load (pickle)."""


class RemoteError(HubmergeError):
    """The hub could not be reached, or refused the request (not found, no token, no permission)."""

    exit_code = 4
