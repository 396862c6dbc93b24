"""Where local copies of public datasets live.

Configs name a public dataset (hub name) *and* a local copy relative to a data root, so the same
config runs offline here and online elsewhere. The root is, in order: the ``LMTRAIN_DATA_ROOT``
environment variable, then ``../shared/data`` next to the repository (this project's machines),
else none (hub only).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "LMTRAIN_DATA_ROOT"
_REPO_ROOT = Path(__file__).resolve().parent.parent


def data_root() -> Path | None:
    """The data root directory, or None when neither the variable nor ../shared/data exists."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    default = _REPO_ROOT.parent / "shared" / "data"
    return default if default.is_dir() else None


def resolve_local(path: str | os.PathLike) -> Path | None:
    """Resolve ``path`` (absolute, or relative to the data root) to an existing file or dir, else None."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p if p.exists() else None
    root = data_root()
    if root is not None and (root / p).exists():
        return root / p
    return p if p.exists() else None
