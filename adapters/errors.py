"""What the adapter lifecycle raises; gateway/errors.py maps each to its HTTP status (one table)."""
from __future__ import annotations

from adapters.store import AdapterExistsError, AdapterNotFoundError
from adapters.validation import AdapterValidationError

__all__ = ["AdapterError", "AdapterExistsError", "AdapterInUseError", "AdapterNotFoundError", "AdapterPlacementError",
           "AdapterValidationError", "RestartNeededError"]


class AdapterError(Exception):
    """An adapter operation that failed and was rolled back; the message is safe to show an admin."""


class AdapterInUseError(AdapterError):
    """The adapter is a variant of an experiment (or otherwise referenced): change that first (409)."""


class RestartNeededError(AdapterError):
    """A backend can only take the new files at a restart the gateway does not manage (409)."""


class AdapterPlacementError(AdapterError):
    """Loading or verifying the new version failed on a backend replica (502); the old version serves on."""
