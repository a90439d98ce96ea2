"""Errors of the server-side core that have no home in :mod:`cloudlet.errors`."""

from __future__ import annotations

from cloudlet.errors import CloudletError, EnvironmentProblem


class TooLargeError(CloudletError):
    """An upload is larger than the configured limit (refused before it fills the disk)."""

    exit_code = 2
    status_code = 413


class NoSpaceError(EnvironmentProblem):
    """The data dir has not enough free space for what was asked."""

    status_code = 507


class AuthError(CloudletError):
    """A missing, unknown, revoked or expired token."""

    exit_code = 9
    status_code = 401


class ForbiddenError(CloudletError):
    """A valid token whose role may not make this call (a device token doing admin work)."""

    exit_code = 9
    status_code = 403
