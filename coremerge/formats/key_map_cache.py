"""Remember how diffusers maps a LoRA file's keys, so that merging a file of a layout seen before need not import
diffusers (two to three seconds, most of a small merge).

The mapping (which file tensor, and which of its rows or columns, each module's factor comes from) depends only on
the file's tensor names and shapes (and kohya alphas), on diffusers' converters and on coremerge's own reading of
them. It is stored as JSON in the user's cache folder, one file per layout, named by a SHA-256 of all of these
(the diffusers version, coremerge's version and the code of its key-mapping modules), written atomically. An
entry that cannot be read or does not describe this file is ignored and rewritten. `COREMERGE_CACHE` names another
folder, or "off" turns it off.
"""

import hashlib
import json
import os
import tempfile
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from ..version import __version__

ENVIRONMENT = "COREMERGE_CACHE"
# the modules whose code decides a mapping (besides diffusers'): their bytes are part of every entry's name
MAPPING_MODULES = ("diffusion_format.py", "transformer_format.py", "traced_conversion.py", "flux.py", "sd3.py",
                   "peft_format.py", "key_map_cache.py")
OFF = ("off", "0", "false", "no")
Value = TypeVar("Value")


def cache_folder() -> Optional[Path]:
    """`$COREMERGE_CACHE`, else `$XDG_CACHE_HOME/coremerge/key-maps` (`~/.cache/...`); None when turned off."""
    setting = os.environ.get(ENVIRONMENT, "")
    if setting.strip().lower() in OFF:
        return None
    if setting:
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "coremerge" / "key-maps"


def remembered(kind: str, layout: Any, convert: Callable[[], dict[str, Value]], pack: Callable[[Value], Any],
               unpack: Callable[[Any], Value]) -> dict[str, Value]:
    """`convert()`, or what it returned for the same kind of conversion and file layout before.

    Args:
        kind: which conversion ("sd-kohya", "dit-flux", ...).
        layout: JSON-able description of everything the conversion reads (names, shapes, alphas).
        convert: the conversion itself; its exceptions propagate and nothing is stored.
        pack: one value of the mapping to JSON.
        unpack: one JSON value back; raises ValueError, KeyError, IndexError or TypeError for anything that does not
            fit the file.
    """
    entry = _entry(kind, layout)
    if entry is not None:
        try:
            stored = json.loads(entry.read_text())
            if not isinstance(stored, dict):
                raise TypeError("not a mapping")
            return {str(name): unpack(value) for name, value in stored.items()}
        except (OSError, ValueError, KeyError, IndexError, TypeError, RecursionError):
            pass  # missing, unreadable or not this file's: convert again
    mapping = convert()
    if entry is not None:
        try:
            packed = {name: pack(value) for name, value in mapping.items()}
        except (AttributeError, TypeError, ValueError):
            return mapping  # a value this cache does not know how to store: not remembered
        _write(entry, packed)
    return mapping


def _entry(kind: str, layout: Any) -> Optional[Path]:
    folder, code = cache_folder(), _mapping_code()
    if folder is None or code is None:
        return None
    try:
        diffusers_version = version("diffusers")
    except PackageNotFoundError:
        return None
    described = json.dumps([kind, __version__, code, diffusers_version, layout], sort_keys=True)
    return folder / f"{hashlib.sha256(described.encode()).hexdigest()}.json"


@lru_cache(maxsize=1)
def _mapping_code() -> Optional[str]:
    """SHA-256 of coremerge's own key-mapping modules, so that an entry written by other code (a checkout between
    releases) is never read back; None (no cache) if their sources cannot be read."""
    digest = hashlib.sha256()
    try:
        for name in MAPPING_MODULES:
            digest.update((Path(__file__).parent / name).read_bytes())
    except OSError:
        return None
    return digest.hexdigest()


def _write(entry: Path, packed: dict) -> None:
    """Write atomically (a reader never sees half a file); a folder that cannot be written just means no cache."""
    temporary: Optional[Path] = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=entry.parent, suffix=".tmp", delete=False) as handle:
            temporary = Path(handle.name)
            json.dump(packed, handle)
        os.replace(temporary, entry)
    except OSError:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
