"""The one error hierarchy of vm0fs, and the errno each error maps to at the FUSE boundary.

    Vm0fsError                  EIO
    +-- ApiError                EIO    (an HTTP answer we cannot use: 400, 409, other 4xx)
    |   +-- Unauthorized        EACCES (401: missing, wrong, expired or revoked key)
    |   +-- NotFound            ENOENT (404: unknown artifact or version, version without files)
    |   +-- Unavailable         EIO    (5xx, 429 or transport errors after retries ran out)
    +-- ArchiveError            EIO    (not gzip, not tar, truncated)
    |   +-- ArchiveTooLarge     EIO    (expands past the configured limit: a decompression bomb)
    +-- CacheError              EIO    (the local cache cannot be written)
"""

from __future__ import annotations

import errno


class Vm0fsError(Exception):
    """Base of every error vm0fs raises on purpose."""

    errno: int = errno.EIO


class ApiError(Vm0fsError):
    """The API answered with something we cannot use."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id

    def __str__(self) -> str:
        parts = [self.message]
        if self.status is not None:
            parts.append(f"(HTTP {self.status}{', ' + self.code if self.code else ''})")
        if self.request_id:
            parts.append(f"[request {self.request_id}]")
        return " ".join(parts)


class Unauthorized(ApiError):
    errno = errno.EACCES


class NotFound(ApiError):
    errno = errno.ENOENT


class Unavailable(ApiError):
    """The service could not be reached or kept failing until the retry budget ran out."""


class ArchiveError(Vm0fsError):
    """The downloaded archive is not a readable tar.gz."""


class ArchiveTooLarge(ArchiveError):
    """A version that expands past the size limit (a decompression bomb, or simply too big)."""


class CacheError(Vm0fsError):
    """The on-disk cache could not be used."""


def errno_for(exc: BaseException) -> int:
    """The errno a failure is reported as at the FUSE boundary."""
    if isinstance(exc, Vm0fsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
