"""What ``/docs`` shows for endpoints that parse their parameters by hand.

Legacy endpoints (the /trigger calls, the ASVO job submissions) read one dict merged
from the query string and the body, so that the real clients work unchanged; FastAPI
cannot see what they read. Their schemas modules declare it with these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DeclaredParameter:
    """One parameter of an endpoint that parses its parameters by hand, as /docs shows it.

    Attributes
    ----------
    name
        The key the clients send.
    schema
        The JSON Schema of its value (type, items, enum, bounds).
    description
        One line, from the docs and the spec.
    required
        Whether a call without it is refused.
    default
        What the parser takes when it is absent (None: no default).
    ignored
        Sent by the real clients and accepted, but never read.
    """

    name: str
    schema: Mapping[str, Any]
    description: str
    required: bool = False
    default: Any = None
    ignored: bool = False

    def json_schema(self) -> dict[str, Any]:
        """The JSON Schema of the value, with its default when it has one."""
        schema = dict(self.schema)
        if self.default is not None:
            schema["default"] = self.default
        return schema


def query_openapi(parameters: Sequence[DeclaredParameter]) -> dict[str, Any]:
    """``openapi_extra`` for an operation that reads ``parameters`` from the query string.

    Parameters
    ----------
    parameters
        What the handler reads.

    Returns
    -------
    dict
        The operation's ``parameters``, every one ``in: query``.
    """
    return {
        "parameters": [
            {
                "name": parameter.name,
                "in": "query",
                "required": parameter.required,
                "description": parameter.description,
                "schema": parameter.json_schema(),
            }
            for parameter in parameters
        ]
    }


def body_openapi(
    parameters: Sequence[DeclaredParameter], media_types: Sequence[str], description: str
) -> dict[str, Any]:
    """``openapi_extra`` for an operation that reads ``parameters`` from its body.

    Parameters
    ----------
    parameters
        What the handler reads: one property of the body's object each.
    media_types
        The body's accepted encodings (a form, JSON), all with the same object.
    description
        How the body is read, shown above its fields.

    Returns
    -------
    dict
        The operation's ``requestBody``.
    """
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            parameter.name: {**parameter.json_schema(), "description": parameter.description}
            for parameter in parameters
        },
    }
    required = [parameter.name for parameter in parameters if parameter.required]
    if required:
        schema["required"] = required
    return {
        "requestBody": {
            "description": description,
            "required": bool(required),
            "content": {media_type: {"schema": schema} for media_type in media_types},
        }
    }
