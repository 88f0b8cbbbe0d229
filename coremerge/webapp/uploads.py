"""Adapters a visitor uploads with a request: a peft `adapter_model.safetensors` with its `adapter_config.json`,
a kohya / diffusers single `.safetensors` file, or a zipped peft folder.

Uploads are copied into the request's own folder (and go with it); rows name them `upload:<file name>`. Limits
per request: MAX_FILES files, MAX_BYTES in all (zips counted unpacked); a zip may hold only plain files with
relative names (no absolute or `..` names, no links) and may not unpack to more than ZIP_RATIO times its size.
"""

import os
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import Optional, Sequence

from ..errors import CoreMergeError
from ..formats.sources import CONFIG_NAME, DIFFUSERS_WEIGHT_NAME, WEIGHT_NAMES

MAX_FILES = 20
MAX_BYTES = 500 * 2**20
ZIP_RATIO = 100  # a zip that unpacks to more than this many times its size is refused as a zip bomb
LIMITS_TEXT = (f"Uploads: at most {MAX_FILES} files and {MAX_BYTES // 2**20} MB per merge (zips counted unpacked); "
               ".safetensors files, adapter_config.json, or .zip of a peft folder.")


def unpack_uploads(uploaded: Optional[Sequence], folder: Path) -> dict[str, Path]:
    """This request's uploads, copied (zips unpacked) into `folder`: {file name as the rows give it: location}.

    Raises:
        CoreMergeError: naming the upload and what is wrong with it.
    """
    paths = uploaded_paths(uploaded)
    if not paths:
        return {}
    if len(paths) > MAX_FILES:
        raise CoreMergeError(f"uploads: {len(paths)} files; at most {MAX_FILES} per merge")
    for path in paths:
        if path.is_symlink() or not path.is_file():
            raise CoreMergeError(f"upload {path.name}: not a plain file")
    if sum(p.stat().st_size for p in paths) > MAX_BYTES:
        raise CoreMergeError(f"uploads: more than {MAX_BYTES // 2**20} MB in all; the limit per merge")
    folder.mkdir(parents=True, exist_ok=True)
    configs = [p for p in paths if p.name == CONFIG_NAME]
    found: dict[str, Path] = {}
    for path in paths:
        if path.suffix == ".zip":
            found[path.name] = _unzip(path, folder / f"zip-{len(found)}")
        elif path.suffix == ".safetensors":
            target = folder / f"file-{len(found)}"
            target.mkdir()
            shutil.copyfile(path, target / path.name)
            if path.name in WEIGHT_NAMES:  # a peft adapter: its config was uploaded beside it
                if len(configs) != 1:
                    raise CoreMergeError(f"upload {path.name}: upload it with its {CONFIG_NAME} (one peft adapter "
                                         "per request this way; zip each peft folder to upload several)")
                shutil.copyfile(configs[0], target / CONFIG_NAME)
                found[path.name] = target
            else:
                found[path.name] = target / path.name
        elif path.name != CONFIG_NAME:
            raise CoreMergeError(f"upload {path.name}: not a .safetensors file, an {CONFIG_NAME} or a .zip")
    return found


def uploaded_paths(uploaded) -> list[Path]:
    """The uploaded files' paths, whatever form the upload control gives them in."""
    if uploaded is None:
        return []
    if isinstance(uploaded, (str, os.PathLike)) or hasattr(uploaded, "name"):
        uploaded = [uploaded]
    if not isinstance(uploaded, (list, tuple)):
        raise CoreMergeError("uploads: expected files")
    paths = []
    for item in uploaded:
        path = getattr(item, "path", None) or getattr(item, "name", None) if not isinstance(item, (str, os.PathLike)) \
            else item
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise CoreMergeError("uploads: expected files")
        paths.append(Path(path))
    return paths


def _unzip(path: Path, target: Path) -> Path:
    """Unpack a zipped peft folder safely; returns the folder that holds adapter_config.json (or the LoRA file)."""
    name = path.name
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise CoreMergeError(f"upload {name}: not a readable zip file") from None
    with archive:
        entries = archive.infolist()
        if len(entries) > 100:
            raise CoreMergeError(f"upload {name}: {len(entries)} entries; a peft folder has a few files")
        unpacked = sum(e.file_size for e in entries)
        if unpacked > MAX_BYTES or unpacked > ZIP_RATIO * max(1, path.stat().st_size):
            raise CoreMergeError(f"upload {name}: unpacks to {unpacked / 2**20:.0f} MB from "
                                 f"{path.stat().st_size / 2**20:.1f} MB; refused (limit {MAX_BYTES // 2**20} MB, "
                                 f"at most {ZIP_RATIO} times the zip)")
        for entry in entries:
            parts = PurePosixPath(entry.filename.replace("\\", "/")).parts
            if entry.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise CoreMergeError(f"upload {name}: entry {entry.filename!r} points outside the zip; refused")
            if stat.S_ISLNK(entry.external_attr >> 16):
                raise CoreMergeError(f"upload {name}: entry {entry.filename!r} is a link; refused")
        target.mkdir(parents=True)
        for entry in entries:
            if entry.is_dir():
                continue
            destination = target.joinpath(*PurePosixPath(entry.filename.replace("\\", "/")).parts)
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(entry) as source, open(destination, "wb") as sink:
                shutil.copyfileobj(source, sink)  # sizes as declared: checked above against the limits
    holders = sorted({p.parent for p in target.rglob(CONFIG_NAME)} | {p.parent for p in target.rglob(DIFFUSERS_WEIGHT_NAME)})
    if len(holders) != 1:
        raise CoreMergeError(f"upload {name}: expected one peft folder ({CONFIG_NAME} with its weights) in the zip, "
                             f"found {len(holders)}")
    return holders[0]
