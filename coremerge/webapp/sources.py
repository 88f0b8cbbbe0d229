"""The app's trust boundary: what an adapter row may name, how it is fetched, and what a visitor sees of it.

A row's source is exactly one of
- a file or folder of the selected preset: a relative path whose real location (symlinks and `..` resolved)
  lies inside the preset's own folder, `presets/<name>/`;
- a file uploaded with this request: `upload:<file name>`;
- a Hub ID, `org/name[@revision][/subfolder | /file]`. The preset's own Hub IDs are fetched as the server
  fetches them (its token, its cache); any other ID with the visitor's token or none, never the server's,
  into the request's own folder, so that nothing one visitor fetched with a token is served to another.
Anything else (an absolute path, `~`, `..`, a path outside the preset's folder) gets one message that does not
depend on whether the path exists. Messages, reports and cards show sources as the visitor gave them; `scrub`
turns any server path left in a message into a short neutral name.
"""

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Mapping, Optional, Sequence

from huggingface_hub import constants

from ..errors import CoreMergeError
from ..formats.sources import WEIGHT_NAMES, parse_hub_id, resolve_hub
from ..presets import PRESETS_DIR, Preset

UPLOAD_PREFIX = "upload:"


@dataclass(frozen=True)
class TrustedSource:
    """A row's source after the boundary: what the visitor typed, and what the library may load."""

    shown: str  # as the visitor gave it (preset paths relative to presets/): every message, report and card
    location: str  # a file or folder on the server, or one of the preset's own Hub IDs
    origin: str  # "preset", "upload" or "hub"
    revision: Optional[str] = None  # the commit, for a visitor's Hub ID


def refusal(number: int) -> CoreMergeError:
    """The one answer for every source outside the boundary, whatever it names and whether or not it exists."""
    return CoreMergeError(f"adapter row {number}: give a Hub ID (org/name), an uploaded file ({UPLOAD_PREFIX}name) "
                          "or a path inside this preset's folder; other places on the server cannot be used")


def preset_root(preset: Preset) -> Path:
    """The preset's own folder, `presets/<name>/`: the only files a visitor may name."""
    return (preset.folder / preset.name).resolve()


def trusted_source(text: str, number: int, preset: Preset, uploads: Mapping[str, Path],
                   token: Optional[str], inputs: Path) -> TrustedSource:
    """Check one row's source against the boundary and fetch it if it is a visitor's Hub ID.

    Args:
        text: the row's source, stripped.
        number: the row's number, for messages.
        uploads: this request's uploaded files, by the name the rows use.
        token: the visitor's Hub token, or None for none.
        inputs: this request's folder for Hub downloads.
    Raises:
        CoreMergeError: the source is outside the boundary, or it cannot be fetched; the message names the row.
    """
    if text.startswith(UPLOAD_PREFIX):
        name = text[len(UPLOAD_PREFIX):].strip()
        if name not in uploads:
            raise CoreMergeError(f"adapter row {number}: no uploaded file named {_printable(name)!r} in this "
                                 "request; upload it (again) with the merge")
        return TrustedSource(text, str(uploads[name]), "upload")
    if any(not c.isprintable() for c in text) or "\\" in text or text.startswith(("/", "~")):
        raise refusal(number)
    parts = PurePosixPath(text).parts
    if ".." in parts:
        raise refusal(number)
    local = _inside_preset(preset, parts)
    if local is not None:
        return TrustedSource("/".join(p for p in parts if p != "."), local, "preset")
    if text.startswith("."):
        raise refusal(number)
    if text in _preset_hub_ids(preset):
        return TrustedSource(text, text, "hub")  # the server's own preset: its token and cache
    parse_hub_id(text)  # a malformed ID: a message that names it, before anything is sent
    resolved = resolve_hub(text, token=token or False, cache_dir=inputs / "hub")
    folder_of_peft = resolved.config_path is not None and resolved.weights_path.name in WEIGHT_NAMES
    location = resolved.weights_path.parent if folder_of_peft else resolved.weights_path
    return TrustedSource(text, str(location), "hub", resolved.revision)


def _inside_preset(preset: Preset, parts: Sequence[str]) -> Optional[str]:
    """The path (as the preset itself names it) if it exists inside the preset's folder once resolved, else None."""
    if not parts:
        return None
    candidate = preset.folder.joinpath(*[p for p in parts if p != "."])
    try:
        real = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    root = preset_root(preset)
    return str(candidate) if real == root or root in real.parents else None


def _preset_hub_ids(preset: Preset) -> set[str]:
    return {a.source for a in preset.adapters if not (preset.folder / a.source).exists()}


def trusted_sources(texts: Sequence[str], preset: Preset, uploads: Mapping[str, Path], token: Optional[str],
                    inputs: Path) -> list[TrustedSource]:
    """Every row through the boundary, in order; raises at the first row outside it (its message scrubbed)."""
    checked: list[TrustedSource] = []
    for number, text in enumerate(texts, 1):
        try:
            checked.append(trusted_source(text, number, preset, uploads, token, inputs))
        except CoreMergeError as error:
            raise CoreMergeError(scrub(str(error), checked)) from None
    return checked


# What a visitor may see of the server's disk: nothing. Known locations become the names the visitor gave;
# anything else under a server folder becomes a neutral word.

def _server_roots() -> list[tuple[str, str]]:
    """(folder, what to show instead), longest first."""
    roots = [(str(PRESETS_DIR), "presets"), (str(Path(constants.HF_HUB_CACHE)), "(Hub cache)"),
             (str(Path(tempfile.gettempdir()).resolve()), "(server temp)"), (tempfile.gettempdir(), "(server temp)"),
             (str(PRESETS_DIR.parent), "(coremerge)"), (str(Path.home()), "(server)"), (str(Path.cwd()), "(server)")]
    first = {}
    for root, shown in roots:
        first.setdefault(root, shown)
    return sorted(((r, s) for r, s in first.items() if len(r) > 1), key=lambda r: -len(r[0]))


_PATH_TAIL = r"[^\s'\"`,;:()\[\]]*"


def scrub(text: str, sources: Sequence[TrustedSource] = ()) -> str:
    """`text` with each source's server location replaced by the name the visitor gave, and any other server
    path by a neutral name (the preset's files keep their preset-relative name)."""
    for source in sorted(sources, key=lambda s: -len(s.location)):
        if source.location != source.shown:
            text = text.replace(source.location, source.shown)
    for root, shown in _server_roots():
        if shown == "presets":
            text = re.sub(re.escape(root) + r"/(" + _PATH_TAIL + ")", r"\1", text)
        else:
            text = re.sub(re.escape(root) + r"(?:/" + _PATH_TAIL + ")?", shown, text)
    return text


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:80]
