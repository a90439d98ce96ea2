"""What a service is, as validated input: the same models check API bodies and CLI options.

FastAPI turns a failed check into a 422 naming the field and the reason; the CLI turns it into
an :class:`~cloudlet.errors.InvalidInputError` with the same text (:func:`validate`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cloudlet.errors import InvalidInputError

# Reverse-DNS, lower case: at least two labels, each starting with a letter or digit. Only
# [a-z0-9.-] can occur, so a service id is also safe as one path component.
SERVICE_ID_RE = r"^[a-z][a-z0-9-]{0,62}(\.[a-z0-9][a-z0-9-]{0,62}){1,7}$"
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
HEX_ID_RE = r"^[0-9a-f]{8,32}$"
USER_RE = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"

ServiceId = Annotated[str, Field(pattern=SERVICE_ID_RE, max_length=200)]
Name = Annotated[str, Field(pattern=NAME_RE)]
HexId = Annotated[str, Field(pattern=HEX_ID_RE)]
Port = Annotated[int, Field(ge=1, le=65535)]
Tag = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")]


def check_service_id(sid: str) -> str:
    if not isinstance(sid, str) or len(sid) > 200 or not re.match(SERVICE_ID_RE, sid):
        raise InvalidInputError(
            f"invalid service id {sid!r}",
            hint="use reverse-DNS in lower case, e.g. org.example.face",
        )
    return sid


class _Fields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("guest_ports", check_fields=False)
    @classmethod
    def _unique_ports(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("guest ports must be unique")
        return v


class ServiceUpdate(_Fields):
    """Fields of a service that may change (PATCH); absent fields stay as they are."""

    description: Annotated[str, Field(max_length=2000)] | None = None
    version: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    tags: Annotated[list[Tag], Field(max_length=32)] | None = None
    base: Name | None = None
    overlay: HexId | None = None
    guest_ports: Annotated[list[Port], Field(min_length=1, max_length=16)] | None = None
    memory_min_mib: Annotated[int, Field(ge=32, le=65536)] | None = None
    memory_ideal_mib: Annotated[int, Field(ge=32, le=65536)] | None = None
    cpus: Annotated[int, Field(ge=1, le=16)] | None = None
    max_users: Annotated[int, Field(ge=1, le=10000)] | None = None


class ServiceSpec(_Fields):
    """A service to register. ``overlay`` is the id of an uploaded (active) overlay."""

    service_id: ServiceId
    description: Annotated[str, Field(max_length=2000)] = ""
    version: Annotated[str, Field(min_length=1, max_length=64)] = "1.0"
    tags: Annotated[list[Tag], Field(max_length=32)] = []
    base: Name
    overlay: HexId | None = None
    guest_ports: Annotated[list[Port], Field(min_length=1, max_length=16)] = [80]
    memory_min_mib: Annotated[int, Field(ge=32, le=65536)] = 256
    memory_ideal_mib: Annotated[int, Field(ge=32, le=65536)] | None = None
    cpus: Annotated[int, Field(ge=1, le=16)] = 1
    max_users: Annotated[int, Field(ge=1, le=10000)] = 10

    @model_validator(mode="after")
    def _ideal_at_least_min(self) -> ServiceSpec:
        if self.memory_ideal_mib is None:
            self.memory_ideal_mib = self.memory_min_mib
        if self.memory_ideal_mib < self.memory_min_mib:
            raise ValueError("memory_ideal_mib must be at least memory_min_mib")
        return self


class StartRequest(BaseModel):
    """Start (or join) an instance of a service."""

    model_config = ConfigDict(extra="forbid")

    service_id: ServiceId
    join: bool = True
    user: Annotated[str, Field(pattern=USER_RE)] | None = None


class LeaveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: Annotated[str, Field(pattern=USER_RE)]


class BaseCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: Name
    name: Name
    memory_mib: Annotated[int, Field(ge=32, le=65536)] = 256
    cpus: Annotated[int, Field(ge=1, le=16)] = 1
    ports: Annotated[list[Port], Field(max_length=16)] | None = None


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Annotated[str, Field(pattern=r"^(admin|device)$")]
    name: Annotated[str, Field(pattern=NAME_RE)] | None = None
    expires_in: Annotated[float, Field(gt=0)] | None = None


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: dict[str, Any]) -> M:
    """Validate outside FastAPI (CLI, package import): the same rules, as InvalidInputError."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        reasons = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()
        )
        raise InvalidInputError(f"invalid {model.__name__}: {reasons}") from None
