"""Where the package's shared files are (config/, launch/, web/), installed or from source."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path


def share_dir() -> Path:
    """The package's share directory: the ament index when installed, else the source tree."""
    with contextlib.suppress(Exception):
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory("sonic_voice"))
    src = Path(__file__).resolve().parents[1]
    if (src / "config").is_dir():
        return src
    return Path(sys.prefix) / "share" / "sonic_voice"


def config_dir() -> Path:
    return share_dir() / "config"


def resolve_config_path(value: str | Path) -> Path:
    """A file named in a parameter: absolute, else relative to the working directory, else
    to the package's config/ directory (``tools_file: tools.yaml``)."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path.resolve() if path.exists() else path
    shipped = config_dir() / path
    return shipped if shipped.exists() else path
