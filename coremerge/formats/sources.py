"""Where an adapter's files are: a local folder or file, or a Hub ID resolved through huggingface_hub.

A source is `path/to/folder`, `path/to/file.safetensors`, or a Hub ID
`org/name[@revision][/subfolder | /file.safetensors]`. A local path that exists always wins.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ..errors import AdapterFormatError, HubError

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # a diffusers LoRA folder: no config, one file
WEIGHT_SUFFIXES = (".safetensors", ".bin")
HUB_TIMEOUT_S = 3.0  # one HEAD request per file; a Hub that does not answer in this time counts as unreachable
HUB_ID = re.compile(r"^(?P<repo>[\w.\-]+/[\w.\-]+)(?:@(?P<revision>[^/]+))?(?:/(?P<path>.+))?$")


@dataclass(frozen=True)
class ResolvedSource:
    """The local files behind a source, and where they came from."""

    source: str  # as the user gave it
    weights_path: Path
    config_path: Optional[Path]
    origin: str  # "local" or "hub"
    revision: Optional[str] = None  # the commit for Hub sources


def resolve_source(source: str, token: Union[str, bool, None] = None) -> ResolvedSource:
    """Find an adapter's weights file and config.

    `token` goes to the Hub download only: None = huggingface_hub's usual one (HF_TOKEN or `hf auth login`),
    False = none, a string = that token.

    Raises:
        AdapterFormatError: a local path that does not exist or holds no adapter, or a malformed Hub ID.
        HubError: a Hub ID that is not on the Hub or cannot be reached.
    """
    path = Path(source).expanduser()
    if path.exists():
        return _resolve_local(source, path)
    if HUB_ID.match(source) is None or source.startswith((".", "/", "~")):
        raise AdapterFormatError(f"{source}: no such file or folder (and not a Hub ID like org/name)")
    return resolve_hub(source, token)


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


@dataclass(frozen=True)
class HubId:
    """`org/name[@revision][/subfolder | /file]`, checked."""

    repo: str
    revision: Optional[str]
    path: str  # "" for the repo's top folder


_HUB_NAME = re.compile(r"^[A-Za-z0-9](?:[\w.\-]{0,94}[A-Za-z0-9])?$", re.ASCII)  # the Hub's rule for owner and repo names
_HUB_SEGMENT = re.compile(r"^[\w\-][\w.\-]*$", re.ASCII)  # a subfolder or file name: no leading dot, no spaces or controls


def parse_hub_id(source: str) -> HubId:
    """Split and check a Hub ID before anything is sent to the Hub.

    Raises:
        AdapterFormatError: naming the ID, for anything but `org/name[@revision][/subfolder | /file]` with names
            the Hub allows (no `..`, no `--`, no empty or dot segments, no spaces or control characters).
    """
    problem = "give a Hub ID like org/name, org/name@revision or org/name/sub/folder"
    match = HUB_ID.match(source)
    if match is None or len(source) > 300:
        raise AdapterFormatError(f"{_shown(source)}: not a valid Hub ID; {problem}")
    owner, name = match["repo"].split("/")
    for part in (owner, name):
        if not _HUB_NAME.match(part) or ".." in part or "--" in part:
            raise AdapterFormatError(f"{_shown(source)}: {part!r} is not a valid Hub owner or repository name; {problem}")
    revision = match["revision"]
    if revision is not None and (not _HUB_SEGMENT.match(revision) or ".." in revision):
        raise AdapterFormatError(f"{_shown(source)}: revision {revision!r} is not valid; {problem}")
    inner = match["path"] or ""
    segments = inner.rstrip("/").split("/") if inner else []
    for segment in segments:
        if segment in ("", ".", "..") or not _HUB_SEGMENT.match(segment):
            raise AdapterFormatError(f"{_shown(source)}: {segment!r} is not a valid subfolder or file name; {problem}")
    return HubId(match["repo"], revision, "/".join(segments))


def _shown(text: str) -> str:
    """Text from a user, safe to print on one line: control characters escaped, at most 80 characters."""
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= 80 else text[:77] + "..."


def resolve_hub(source: str, token: Union[str, bool, None] = None, cache_dir: Optional[Path] = None
                ) -> ResolvedSource:
    """Download a Hub ID's adapter files, failing fast: each file is first asked for with one HEAD request of
    at most HUB_TIMEOUT_S seconds and no retries, so an unknown ID or an unreachable Hub fails within seconds.

    `token` as in `resolve_source`; `cache_dir` a Hub cache of the caller's (None: the shared one).
    """
    hub_id = parse_hub_id(source)
    repo, revision, folder = hub_id.repo, hub_id.revision, hub_id.path
    # imported here: huggingface_hub takes a few tenths of a second to import, which local files need not pay
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url

    def download(filename: str) -> Path:
        if not constants.HF_HUB_OFFLINE:
            # huggingface_hub retries a failing HEAD for up to a minute when nothing is cached; ask once first
            get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision), token=token, timeout=HUB_TIMEOUT_S)
        return Path(hf_hub_download(repo, filename, revision=revision, token=token, cache_dir=cache_dir,
                                    etag_timeout=HUB_TIMEOUT_S))

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
        raise _hub_error(source, repo, revision, error, token) from error
    return ResolvedSource(source, weights, config, "hub", revision=_commit_of(weights))


def _join(folder: str, name: str) -> str:
    return name if folder in ("", ".") else f"{folder}/{name}"


def _optional(download):
    """A file that may be absent: None if the repo lacks it (or the offline cache does)."""
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    try:
        return download()
    except (RemoteEntryNotFoundError, LocalEntryNotFoundError):
        return None


def _commit_of(cached_file: Path) -> Optional[str]:
    """The commit hash in a Hub cache path `.../snapshots/<commit>/...`."""
    parts = cached_file.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def _hub_error(source: str, repo: str, revision: Optional[str], error: Exception,
               token: Union[str, bool, None] = None) -> Exception:
    """One line for any Hub failure. With `token` None (the CLI) a private repo's advice is `hf auth login`;
    with a token given or refused (the app), it is a read token."""
    import httpx2  # huggingface_hub's HTTP client (a dependency of it): its timeout error
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    login = "log in with `hf auth login`" if token is None else "give a read token that can see it"
    if isinstance(error, GatedRepoError):
        return HubError(f"{source}: {repo} is gated; accept its terms on the Hub and {login}")
    if isinstance(error, RepositoryNotFoundError):
        return HubError(f"{source}: repository {repo} not found on the Hub (for a private repo, {login})")
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
        return AdapterFormatError(f"{source}: not a valid Hub ID ({str(error).splitlines()[0]})")
    if isinstance(error, httpx2.TimeoutException):
        return HubError(f"{source}: the Hub did not answer within {HUB_TIMEOUT_S:g} s; try again later")
    first_line = str(error).splitlines()[0] if str(error).strip() else "no answer"
    return HubError(f"{source}: the Hub could not be reached ({first_line})")
