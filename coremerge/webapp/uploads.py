"""Adapters a visitor uploads with a request (filled in below)."""

from pathlib import Path
from typing import Optional, Sequence


def unpack_uploads(uploaded: Optional[Sequence], folder: Path) -> dict[str, Path]:
    return {}
