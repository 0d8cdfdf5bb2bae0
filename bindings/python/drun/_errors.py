"""drun's exceptions: one base class, one subclass per kind of failure a caller acts on."""

from typing import Optional, Tuple


class Error(Exception):
    """A drun failure. ``code`` is drun's error code name (``"digest_mismatch"``, ...); ``path``,
    ``range`` (begin, end), ``piece`` (its index in the manifest) and ``source`` (the origin URL
    or peer last tried) say what failed where they apply."""

    def __init__(self, message: str, code: str = "", path: Optional[str] = None,
                 range: Optional[Tuple[int, int]] = None, source: Optional[str] = None) -> None:
        super().__init__(message)
        self.code = code
        self.path = path
        self.range = range
        self.source = source
        self.piece: Optional[int] = None


class VerificationError(Error):
    """Bytes, files or a bundle that do not match the signature, or a signature that does not
    verify against the trust you gave."""


class AuthorizationError(Error):
    """A peer refused: this caller is not authorized for the artifact (or its token is bad)."""


class SourceError(Error):
    """An origin or peer kept failing (network, HTTP status, timeouts) after retries."""


class StoreError(Error):
    """The encrypted store could not read or write (disk, missing piece, wrong key)."""


class ConfigError(Error):
    """An unusable argument, key, certificate or file: fix the call, not the network."""
