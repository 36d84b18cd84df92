"""The "Remote server…" dialog: the server's URL and token (typed, or read from a file).

The URL and the token file's path are remembered in the plugin's settings; the token itself only
when the user ticks "Remember token" (it is a password: it stays out of the settings file otherwise).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

from qtpy.QtWidgets import (
    QCheckBox, QDialog, QDialogButtonBox, QFileDialog, QFormLayout, QHBoxLayout, QLineEdit, QPushButton, QWidget,
)

from . import _settings

DEFAULT_URL = "http://127.0.0.1:8765"
URL_KEY, TOKEN_FILE_KEY, TOKEN_KEY = "remote_url", "remote_token_file", "remote_token"
"""Settings keys (``settings.json``)."""


class TokenFileError(ValueError):
    """The token file cannot be read or is empty; the message names it."""


def read_token_file(path: Path) -> str:
    """The token in ``path`` (its first line, whitespace stripped)."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read the token file {path}: {exc}") from None
    if not text:
        raise TokenFileError(f"the token file {path} is empty")
    return text.splitlines()[0].strip()


class RemoteDialog(QDialog):
    """URL, token, "Token file…", "Remember token"; filled from the remembered settings.

    Args:
        parent: Qt parent.
    """

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Connect to a Mamba-HoME server")
        saved = _settings.load_settings()
        form = QFormLayout(self)
        self.url_edit = QLineEdit(str(saved.get(URL_KEY) or DEFAULT_URL))
        self.token_edit = QLineEdit(str(saved.get(TOKEN_KEY) or ""))
        self.token_edit.setEchoMode(QLineEdit.EchoMode.Password)
        self.token_edit.setPlaceholderText("none (a localhost server without a token)")
        self.token_file: Optional[str] = saved.get(TOKEN_FILE_KEY)
        if not self.token_edit.text() and self.token_file:
            try:
                self.token_edit.setText(read_token_file(Path(self.token_file)))
            except TokenFileError:
                self.token_file = None  # moved or deleted since: ask again
        self.token_file_button = QPushButton("Token file…")
        self.token_file_button.clicked.connect(self._choose_token_file)
        self.remember_token = QCheckBox("Remember token (stored in the plugin's settings file)")
        self.remember_token.setChecked(bool(saved.get(TOKEN_KEY)))
        token_row = QHBoxLayout()
        token_row.addWidget(self.token_edit, 1)
        token_row.addWidget(self.token_file_button)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Connect")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow("Server URL", self.url_edit)
        form.addRow("Token", token_row)
        form.addRow(self.remember_token)
        form.addRow(buttons)

    def _choose_token_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "File holding the server's token")
        if path:
            self.load_token_file(Path(path))

    def load_token_file(self, path: Path) -> None:
        """Put the token in ``path`` into the token field (the path, not the token, is remembered)."""
        try:
            self.token_edit.setText(read_token_file(path))
        except TokenFileError as exc:
            self.token_edit.setPlaceholderText(str(exc))
            self.token_edit.clear()
            return
        self.token_file = str(path)

    def values(self) -> Tuple[str, Optional[str]]:
        """``(url, token or None)``."""
        return self.url_edit.text().strip().rstrip("/"), self.token_edit.text().strip() or None

    def remember(self) -> None:
        """Store the URL and the token file; the token only when "Remember token" is ticked."""
        url, token = self.values()
        try:
            _settings.save_setting(URL_KEY, url)
            _settings.save_setting(TOKEN_FILE_KEY, self.token_file)
            _settings.save_setting(TOKEN_KEY, token if self.remember_token.isChecked() else None)
        except OSError:  # an unwritable config folder must not stop the connection
            pass


def ask_connection(parent: Optional[QWidget] = None) -> Optional[Tuple[str, Optional[str]]]:
    """Show the dialog; ``(url, token)`` when the user pressed Connect (remembered), else ``None``."""
    dialog = RemoteDialog(parent)
    if dialog.exec() != QDialog.DialogCode.Accepted:
        return None
    url, token = dialog.values()
    if not url:
        return None
    dialog.remember()
    return url, token
