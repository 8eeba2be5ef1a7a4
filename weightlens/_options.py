"""One resolver for option objects: a frozen dataclass given whole, field by field, or both.

A public function with many settings takes ``options: XOptions | None = None, **overrides``:
``options`` (defaults when None) with ``overrides`` applied is the one object it reads, validated
once by ``XOptions.__post_init__``. The keyword call forms ``f(x, seed=1)`` and the object form
``f(x, options=XOptions(seed=1))`` therefore give the same settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from weightlens.errors import InvalidParameterError

__all__ = ["option_names", "resolve_options"]

T = TypeVar("T")


def option_names(cls: type) -> list[str]:
    """The field names of the option class ``cls``, sorted."""
    return sorted(f.name for f in dataclasses.fields(cls))


def resolve_options(cls: type[T], options: T | None, overrides: Mapping[str, Any], *, caller: str) -> T:
    """``options`` (``cls()`` when None) with ``overrides`` applied; ``caller`` names the function in errors.

    Raises
    ------
    InvalidParameterError
        ``options`` is not a ``cls`` or None, an override names no field of ``cls`` (the message
        lists the valid names), or a value is outside what ``cls`` allows.
    """
    name = cls.__name__
    if options is not None and not isinstance(options, cls):
        raise InvalidParameterError(
            f"The 'options' parameter of {caller} must be a {name} or None. Got {options!r} instead."
        )
    fields = option_names(cls)
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise InvalidParameterError(
            f"{caller}() got unknown option(s) {unknown}; valid options: {fields} (see {name})."
        )
    return dataclasses.replace(options if options is not None else cls(), **overrides)
