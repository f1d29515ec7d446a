"""Error types with a reason a user can act on. Every refusal in the system raises one of these."""
from __future__ import annotations


class MegaPortraitError(Exception):
    """Base class: `reason` is a short machine-readable code, the message says what to do."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class PhotoRejected(MegaPortraitError):
    """A source photo cannot be used; `reason` is one of the codes in `client.faces.REJECTION_REASONS`."""

    def __init__(self, origin: str, reason: str, detail: str) -> None:
        super().__init__(f"{origin}: {reason}: {detail}", reason=reason)
        self.origin = origin
        self.detail = detail


class ModelNotFound(MegaPortraitError):
    """Weights were configured (or needed) at a local path that does not hold them. Nothing is downloaded."""

    reason = "model_not_found"

    def __init__(self, what: str, path: object, hint: str = "") -> None:
        msg = f"{what} not found at {path!s}. MegaPortrait never downloads weights: place them there or change the config."
        super().__init__(msg + (f" {hint}" if hint else ""))
        self.what = what
        self.path = path


class ConfigError(MegaPortraitError):
    """A configuration or policy file is invalid; the message names the file and line."""

    reason = "config_invalid"
