"""``Controls``: a widget's user-facing controls, as one ipywidgets container and by name.

Every weightlens widget has ``.controls``: display it on its own, find it in the widget's layout, or
drive the widget from code by name (``explorer.controls["alpha"].value = 0.5``).
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, Mapping, Sequence, ValuesView
from typing import Any

import ipywidgets as widgets

__all__ = ["Controls"]


class Controls(widgets.VBox):
    """The user-facing controls of a widget: a ``VBox`` of the rows shown together, and their names.

    Parameters
    ----------
    named : mapping of str to ipywidgets.Widget
        Every control by name, also those the widget shows beside one figure only.
    rows : sequence of ipywidgets.Widget, optional
        The children of the box (default: the named controls, one per row).

    ``controls[name]``, ``name in controls``, ``list(controls)`` (or ``.names``), ``values()`` and
    ``items()`` read them as a read-only dict would (``keys`` is taken: it is the widget's list of
    synced traits).
    """

    def __init__(self, named: Mapping[str, widgets.Widget], rows: Sequence[widgets.Widget] | None = None,
                 **kwargs: Any) -> None:
        self._named = dict(named)
        super().__init__(children=list(rows if rows is not None else named.values()), **kwargs)
        self.add_class("wl-controls")

    def __getitem__(self, name: str) -> widgets.Widget:
        try:
            return self._named[name]
        except KeyError:
            raise KeyError(f"No control {name!r}; the controls are {list(self._named)}.") from None

    def __contains__(self, name: object) -> bool:
        return name in self._named

    def __iter__(self) -> Iterator[str]:
        return iter(self._named)

    @property
    def names(self) -> list[str]:
        """The controls' names, in order."""
        return list(self._named)

    def values(self) -> ValuesView[widgets.Widget]:
        return self._named.values()

    def items(self) -> ItemsView[str, widgets.Widget]:
        return self._named.items()

    def __repr__(self) -> str:
        return f"Controls({', '.join(self._named)})"
