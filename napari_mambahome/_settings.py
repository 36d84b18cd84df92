"""Where the plugin keeps its cases and fine-tuned models, remembered between sessions.

Choices are stored in ``settings.json`` in the user config folder (``platformdirs``), written
atomically. Environment variables override them (tests, shared workstations):

- ``MAMBAHOME_CASES_DIR``: the case store folder.
- ``MAMBAHOME_MODELS_DIR``: where fine-tuned model versions are written.
- ``MAMBAHOME_CONFIG_DIR``: where ``settings.json`` lives.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

APP_NAME = "napari-mambahome"
CASES_ENV = "MAMBAHOME_CASES_DIR"
MODELS_ENV = "MAMBAHOME_MODELS_DIR"
CONFIG_ENV = "MAMBAHOME_CONFIG_DIR"


class CaseFolderError(ValueError):
    """The remembered case folder is missing; the message names it."""


def config_dir() -> Path:
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    from platformdirs import user_config_dir

    return Path(user_config_dir(APP_NAME))


def data_dir() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir(APP_NAME))


def _settings_file() -> Path:
    return config_dir() / "settings.json"


def load_settings() -> Dict[str, Any]:
    """The saved settings, or ``{}`` when none were saved or the file is unreadable."""
    try:
        return dict(json.loads(_settings_file().read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def save_setting(key: str, value: Any) -> None:
    """Store one setting (atomic write: temp file in the same folder + ``os.replace``)."""
    settings = load_settings()
    settings[key] = value
    target = _settings_file()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".settings-", suffix=".json", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(settings, fh, indent=2)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cases_dir() -> Optional[Path]:
    """The case folder chosen by env var or earlier choice, or ``None`` when never chosen."""
    env = os.environ.get(CASES_ENV)
    if env:
        return Path(env)
    saved = load_settings().get("cases_dir")
    return Path(saved) if saved else None


def set_cases_dir(path: Path) -> None:
    """Remember ``path`` as the case folder for future sessions."""
    save_setting("cases_dir", str(Path(path)))


def check_cases_dir(path: Path) -> Path:
    """Refuse a case folder that does not exist.

    ``engine.cases.CaseStore`` creates missing folders, which is right for a folder the user just
    chose; a remembered folder that vanished (moved, unmounted drive) must not be replaced by an empty
    one that hides the user's cases. Writability and "is a file" are checked by the CaseStore.

    Raises:
        CaseFolderError: the folder is missing.
    """
    path = Path(path)
    if not path.exists():
        raise CaseFolderError(f"case folder {path} does not exist (moved or unmounted?); "
                              "create it or choose another folder with 'Folder…'")
    return path


def models_dir() -> Path:
    """Folder for fine-tuned model versions (created on demand)."""
    env = os.environ.get(MODELS_ENV)
    return Path(env) if env else data_dir() / "models"
