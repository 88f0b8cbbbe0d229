"""Where a merged adapter goes: the --output folder checked before any adapter is read, then replaced atomically.

The rule: a folder is replaced only if everything in it is a file coremerge writes (its adapter files, its
merge_report.json, its model card); anything else there is the user's, and the merge is refused instead.
"""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

from ..errors import OutputError, describe_os_error
from .sources import CONFIG_NAME, DIFFUSERS_WEIGHT_NAME

WEIGHTS_NAME = "adapter_model.safetensors"
REPORT_NAME = "merge_report.json"
CARD_NAME = "README.md"
WRITTEN_NAMES = (CONFIG_NAME, WEIGHTS_NAME, DIFFUSERS_WEIGHT_NAME, REPORT_NAME, CARD_NAME)
REPORT_KEYS = ("coremerge_version", "method", "sources", "modules")  # every merge report has them
CARD_MARKS = ("\n  - coremerge\n", "by [coremerge](")  # lines of coremerge's model card template
STAGING = ".{name}.partial-"  # + 8 random characters (tempfile.mkdtemp)
RETIRED = ".{name}.old-"
RANDOM_CHARS = 8


def check_output_location(output: Path, sources: Sequence[str] = ()) -> Path:
    """Check everything about `--output` that can fail, before any adapter is read.

    Returns:
        The absolute output path (symlinks in its parents resolved).
    Raises:
        OutputError: naming the problem: an empty name, a symlink, a file, a folder holding something
            coremerge did not write, a parent that is missing, not a folder or not writable, a name too long
            for the file system once the staging suffix is added, or an output that is (or holds) an input.
    """
    shown = str(output)
    if not shown.strip():
        raise OutputError(f"--output {shown!r}: give a folder name")
    target = Path(os.path.abspath(Path(output).expanduser()))
    if not target.name:
        raise OutputError(f"--output {shown}: give a folder name, not the root")
    parent = _parent(shown, target.parent)
    target = parent / target.name
    if target.is_symlink():
        raise OutputError(
            f"--output {shown}: is a symbolic link (to {os.readlink(target)}); give the folder itself, "
            "coremerge does not replace links"
        )
    _check_name_length(shown, parent, target.name)
    _check_not_an_input(shown, target, sources)
    if target.exists():
        if not target.is_dir():
            raise OutputError(f"--output {shown}: is a file, not a folder; give a folder")
        try:
            foreign = first_foreign_entry(target)
        except OSError as error:
            raise OutputError(f"--output {shown}: cannot read the folder ({describe_os_error(error)})") from error
        if foreign is not None:
            raise OutputError(
                f"--output {shown}: the folder holds {foreign}, which coremerge did not write; coremerge replaces "
                "only its own earlier output, so choose a new folder (or move that file away)"
            )
    _check_writable(shown, parent)
    return target


def _parent(shown: str, parent: Path) -> Path:
    """The nearest existing ancestor must be a writable folder; missing folders below it are created later."""
    ancestor = parent
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"--output {shown}: {ancestor} is a file (or a broken link), not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"--output {shown}: permission denied: cannot write in {ancestor}")
    return ancestor.resolve() / parent.relative_to(ancestor)


def _check_name_length(shown: str, parent: Path, name: str) -> None:
    ancestor = parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    try:
        name_max = os.pathconf(ancestor, "PC_NAME_MAX")
        path_max = os.pathconf(ancestor, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    longest = len(STAGING.format(name=name).encode()) + RANDOM_CHARS
    if longest > name_max:
        raise OutputError(
            f"--output {shown}: the name is too long ({len(name.encode())} bytes; at most "
            f"{name_max - longest + len(name.encode())} leave room for coremerge's staging folder)"
        )
    too_long = next((part for part in parent.parts if len(part.encode()) > name_max), None)
    if too_long is not None:
        raise OutputError(f"--output {shown}: the folder name {too_long[:40]}... is too long")
    if len(str(parent / RETIRED.format(name=name)).encode()) + RANDOM_CHARS + len(name) + 1 >= path_max:
        raise OutputError(f"--output {shown}: the path is too long for the file system")


def first_foreign_entry(folder: Path) -> Optional[str]:
    """The first entry (by name) that coremerge did not write, or None if every entry is coremerge's.

    A non-empty folder counts as coremerge's only with a merge_report.json that has the report's keys.
    """
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    for entry in entries:
        if entry.name not in WRITTEN_NAMES or entry.is_symlink() or not entry.is_file():
            return entry.name
    report = folder / REPORT_NAME
    if entries and not report.exists():
        return f"{entries[0].name} (and no {REPORT_NAME})"
    if entries and not _is_report(report):
        return f"a {REPORT_NAME} that is not coremerge's"
    card = folder / CARD_NAME
    if card.exists() and not _is_model_card(card):
        return CARD_NAME
    return None


def _is_report(path: Path) -> bool:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and all(key in report for key in REPORT_KEYS)


def _is_model_card(path: Path) -> bool:
    try:
        text = path.read_text()
    except (OSError, ValueError):
        return False
    return text.startswith("---\n") and all(mark in text for mark in CARD_MARKS)


def _check_not_an_input(shown: str, target: Path, sources: Sequence[str]) -> None:
    for source in sources:
        try:
            path = Path(source).expanduser()
            if not path.exists():
                continue
            resolved = path.resolve()
        except OSError:
            continue
        if resolved == target or target in resolved.parents:
            raise OutputError(f"--output {shown}: is (or holds) the input {source}; choose another folder")


def _check_writable(shown: str, parent: Path) -> None:
    """Create and remove a staging folder where the real one will go: whatever the file system says, now."""
    ancestor = parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    try:
        probe = tempfile.mkdtemp(prefix=".coremerge-probe-", dir=ancestor)
        os.rmdir(probe)
    except OSError as error:
        raise OutputError(f"--output {shown}: cannot write in {ancestor} ({describe_os_error(error)})") from error


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_folder(output: Path, sources: Sequence[str] = ()) -> Iterator[Path]:
    """A staging folder beside `output` that replaces it only if the block succeeds.

    The location is checked again just before the swap, so a file put there during the merge is not lost.
    The new folder and its files get the permissions of the user's umask (mkdtemp's are 0700).
    """
    target = check_output_location(output, sources)
    shown = str(output)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING.format(name=target.name), dir=target.parent))
    except OSError as error:
        raise OutputError(f"--output {shown}: cannot create it ({describe_os_error(error)})") from error
    try:
        yield staging
        mask = _umask()
        staging.chmod(0o777 & ~mask)
        for written in staging.iterdir():  # safetensors writes its files 0600
            written.chmod(0o666 & ~mask)
        check_output_location(output, sources)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=RETIRED.format(name=target.name), dir=target.parent))
            target.rename(retired / target.name)
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
    except OSError as error:
        raise OutputError(f"--output {shown}: writing failed ({describe_os_error(error)})") from error
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
