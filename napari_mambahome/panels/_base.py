"""What every dock panel is: a titled box over the dock's :class:`.._session.Session`."""
from __future__ import annotations

from typing import Optional

from qtpy.QtWidgets import QGroupBox, QWidget

from .._session import Session


class Panel(QGroupBox):
    """One section of the dock. Subclasses set ``name`` and ``title`` and build their widgets.

    A panel reads and changes the session and reacts to its signals; it never calls another panel.

    Args:
        session: the dock's session.
        parent: Qt parent.
    """

    name = ""
    title = ""

    def __init__(self, session: Session, parent: Optional[QWidget] = None) -> None:
        super().__init__(self.title, parent)
        self.session = session

    def dock_closing(self) -> None:
        """The dock's close button was pressed; the session is still open (it closes right after): take out of the
        viewer what only this panel makes sense of."""
