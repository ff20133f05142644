"""The fedpers exception hierarchy: every message says what was wrong and how to fix it."""

from __future__ import annotations


class FedpersError(Exception):
    """Base class of every error fedpers raises on purpose."""


class ConfigError(FedpersError, ValueError):
    """A configuration key is unknown, has the wrong type, or an invalid value."""


class AssetError(FedpersError):
    """A model or data archive is missing, corrupt or cannot be fetched."""


class DataError(FedpersError, ValueError):
    """Local data is unreadable, malformed, empty or unusable for training."""


class ModelError(FedpersError):
    """A model cannot be built or does not match what was expected."""


class ParameterError(FedpersError, ValueError):
    """Shared tensors do not match the expected key set, shapes or dtypes."""


class PrivacyBudgetExhausted(FedpersError):
    """Training would take a client's ε past its budget; nothing was trained."""


class StateError(FedpersError):
    """The encrypted on-device personal state is missing its key, tampered or truncated."""


class DeviceRefusal(FedpersError):
    """The run asks for more than this device allows (its ε cap, its δ, training without DP)."""
