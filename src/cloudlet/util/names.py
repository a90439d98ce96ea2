"""Validation of user-supplied names: nothing from a request or a file reaches a path unchecked."""

from __future__ import annotations

import re

from cloudlet.errors import InvalidInputError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is safe as a single path component, else raise.

    Allowed: 1-63 characters of letters, digits, ``.``, ``_`` and ``-``, starting with a letter
    or digit (so never ``.``, ``..``, hidden files or anything with a slash).
    """
    if not isinstance(name, str) or not _NAME.match(name) or name in {".", ".."}:
        raise InvalidInputError(
            f"invalid {what} {name!r}",
            hint="use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name
