"""Where an adapter's files are: a local folder or file, or a Hub ID resolved through huggingface_hub.

A source is `path/to/folder`, `path/to/file.safetensors`, or a Hub ID
`org/name[@revision][/subfolder | /file.safetensors]`. A local path that exists always wins.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                    RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

from ..errors import AdapterFormatError, HubError

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # a diffusers LoRA folder: no config, one file
WEIGHT_SUFFIXES = (".safetensors", ".bin")
HUB_ID = re.compile(r"^(?P<repo>[\w.\-]+/[\w.\-]+)(?:@(?P<revision>[^/]+))?(?:/(?P<path>.+))?$")


@dataclass(frozen=True)
class ResolvedSource:
    """The local files behind a source, and where they came from."""

    source: str  # as the user gave it
    weights_path: Path
    config_path: Optional[Path]
    origin: str  # "local" or "hub"
    revision: Optional[str] = None  # the commit for Hub sources


def resolve_source(source: str) -> ResolvedSource:
    """Find an adapter's weights file and config.

    Raises:
        AdapterFormatError: a local path that does not exist or holds no adapter.
        HubError: a Hub ID that is not on the Hub or cannot be reached.
    """
    path = Path(source).expanduser()
    if path.exists():
        return _resolve_local(source, path)
    match = HUB_ID.match(source)
    if match is None or source.startswith((".", "/", "~")):
        raise AdapterFormatError(f"{source}: no such file or folder (and not a Hub ID like org/name)")
    return _resolve_hub(source, match["repo"], match["revision"], match["path"])


def _resolve_local(source: str, path: Path) -> ResolvedSource:
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise AdapterFormatError(f"{source}: not a .safetensors or .bin adapter file")
        config = path.with_name(CONFIG_NAME)
        return ResolvedSource(source, path, config if config.is_file() else None, "local")
    config = path / CONFIG_NAME
    if not config.is_file():
        if (path / DIFFUSERS_WEIGHT_NAME).is_file():
            return ResolvedSource(source, path / DIFFUSERS_WEIGHT_NAME, None, "local")
        raise AdapterFormatError(
            f"{source}: folder has no {CONFIG_NAME} (peft) or {DIFFUSERS_WEIGHT_NAME} (diffusers); "
            "is it a LoRA adapter folder?"
        )
    for name in WEIGHT_NAMES:
        if (path / name).is_file():
            return ResolvedSource(source, path / name, config, "local")
    raise AdapterFormatError(f"{source}: folder has no {' or '.join(WEIGHT_NAMES)}")


def _resolve_hub(source: str, repo: str, revision: Optional[str], inner: Optional[str]) -> ResolvedSource:
    def download(filename: str) -> Path:
        return Path(hf_hub_download(repo, filename, revision=revision))

    folder = "" if inner is None else inner.strip("/")
    try:
        if folder.endswith(WEIGHT_SUFFIXES):
            weights = download(folder)
            config = _optional(lambda: download(_join(str(Path(folder).parent), CONFIG_NAME)))
        else:
            config = _optional(lambda: download(_join(folder, CONFIG_NAME)))
            if config is None:  # a diffusers LoRA repo
                weights = download(_join(folder, DIFFUSERS_WEIGHT_NAME))
            else:
                weights = _optional(lambda: download(_join(folder, WEIGHT_NAMES[0])))
                weights = weights or download(_join(folder, WEIGHT_NAMES[1]))
    except Exception as error:  # noqa: BLE001 - every Hub failure becomes one message
        raise _hub_error(source, repo, revision, error) from error
    return ResolvedSource(source, weights, config, "hub", revision=_commit_of(weights))


def _join(folder: str, name: str) -> str:
    return name if folder in ("", ".") else f"{folder}/{name}"


def _optional(download):
    """A file that may be absent: None if the repo lacks it (or the offline cache does)."""
    try:
        return download()
    except (RemoteEntryNotFoundError, LocalEntryNotFoundError):
        return None


def _commit_of(cached_file: Path) -> Optional[str]:
    """The commit hash in a Hub cache path `.../snapshots/<commit>/...`."""
    parts = cached_file.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def _hub_error(source: str, repo: str, revision: Optional[str], error: Exception) -> Exception:
    if isinstance(error, GatedRepoError):
        return HubError(f"{source}: {repo} is gated; accept its terms on the Hub and log in with `hf auth login`")
    if isinstance(error, RepositoryNotFoundError):
        return HubError(f"{source}: repository {repo} not found on the Hub (private repos need `hf auth login`)")
    if isinstance(error, RevisionNotFoundError):
        return HubError(f"{source}: revision {revision} not found in {repo}")
    if isinstance(error, RemoteEntryNotFoundError):
        return HubError(
            f"{source}: {repo} has no LoRA adapter files there ({CONFIG_NAME} and adapter weights, or "
            f"{DIFFUSERS_WEIGHT_NAME}); name the .safetensors file, e.g. {repo}/file.safetensors"
        )
    if isinstance(error, LocalEntryNotFoundError):
        why = "the Hub is offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the Hub is not reachable"
        return HubError(
            f"{source}: {why} and {repo} is not in the local Hub cache; on a machine with network run "
            f"`hf download {repo} --local-dir DIR`, then pass DIR instead of the ID"
        )
    if isinstance(error, HFValidationError):
        return AdapterFormatError(f"{source}: not a valid Hub ID or local path ({error})")
    if isinstance(error, (HfHubHTTPError, OSError)):
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        return HubError(f"{source}: the Hub could not be reached ({first_line})")
    return error
