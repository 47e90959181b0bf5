"""Where adapter versions live on disk and what makes one complete.

Layout under `data_dir/adapters`: one folder per finished version (`v0003-20261124T1530`, ids
sort by their number) holding peft's files and `headwater.json`; `.tmp-<version>` while a run
writes one. The trainer's registry writes this layout; the query consumers read it.
"""

from __future__ import annotations

import re
from pathlib import Path

from headwater.settings import Settings

METADATA = "headwater.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_config.json")
VERSION_RE = re.compile(r"^v(\d{4,})-\d{8}T\d{4}$")


def adapters_root(settings: Settings) -> Path:
    return settings.data_dir / "adapters"


def adapter_path(settings: Settings, version: str) -> Path:
    """Folder of an adapter version (what peft `load_adapter` takes)."""
    return adapters_root(settings) / version


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (*WEIGHTS, METADATA))


def valid_version(version: str) -> bool:
    """A version id the registry could have made (never a path: announcements are input)."""
    return bool(VERSION_RE.fullmatch(version))
