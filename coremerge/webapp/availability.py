"""Can a preset run here? Bundled presets always can; Hub presets need every ID on the Hub or in its cache.

The app calls `require_available` each time a preset is chosen, so the check is cheap: a few file lookups in
the local Hub cache, and only for files not cached there one HEAD request each to the Hub (none when
HF_HUB_OFFLINE is set). Nothing is downloaded.
"""

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import (GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError,
                                    RevisionNotFoundError)

from ..errors import HubError
from ..formats.sources import CONFIG_NAME, HUB_ID, WEIGHT_NAMES, WEIGHT_SUFFIXES
from ..presets import Preset, list_presets

HEAD_TIMEOUT_S = 3.0
# The file whose presence says a base model repo is there, by the preset kind's loader.
BASE_MODEL_FILE = {"image-generation": "model_index.json"}  # diffusers pipelines; others: transformers
TRANSFORMERS_CONFIG = "config.json"


@dataclass(frozen=True)
class HubNeed:
    """What one Hub ID of a preset needs: a repo at a revision, and files in it (each a set of alternatives)."""

    source: str  # the ID as the preset file gives it
    repo: str
    revision: Optional[str]
    files: tuple[tuple[str, ...], ...]  # every group needs one of its names


def require_available(preset: Preset, *, base_model: bool = True) -> None:
    """Raise HubError unless `preset` can run here; bundled presets always can.

    A Hub preset can run when each adapter (and, with `base_model`, the base model) is in the local Hub cache,
    or, with the Hub online, the Hub answers that its files are there (one HEAD request per file not cached:
    a weights file, or a peft folder's config and weights; successes are remembered for the process's life).

    Raises:
        HubError: names the preset, the first ID that cannot be resolved and why, and the bundled presets,
            which work offline.
    """
    if preset.bundled:
        return
    for need in hub_needs(preset, base_model=base_model):
        why = _why_unavailable(need)
        if why is not None:
            bundled = ", ".join(p.name for p in list_presets(preset.folder) if p.bundled) or "none here"
            raise HubError(
                f"preset {preset.name} needs the Hugging Face Hub: {why}; the bundled presets work offline: {bundled}")


def hub_needs(preset: Preset, *, base_model: bool = True) -> list[HubNeed]:
    """The Hub IDs of a preset (adapters first, then the base model) and the files each needs.

    Sources that are local paths next to the preset file need nothing from the Hub and are left out.
    """
    needs = [_adapter_need(a.source) for a in preset.adapters if not _is_local(preset, a.source)]
    if base_model and not _is_local(preset, preset.base_model):
        base_file = BASE_MODEL_FILE.get(preset.kind, TRANSFORMERS_CONFIG)
        needs.append(_repo_need(preset.base_model, ((base_file,),)))
    return needs


def _is_local(preset: Preset, source: str) -> bool:
    return (preset.folder / source).exists()  # as Preset.resolve decides


def _adapter_need(source: str) -> HubNeed:
    """An adapter ID needs its weights file (`org/name/file.safetensors`) or a peft folder's config and weights."""
    match = _match(source)
    inner = (match["path"] or "").strip("/")
    if inner.endswith(WEIGHT_SUFFIXES):
        files = ((inner,),)
    else:
        files = ((_join(inner, CONFIG_NAME),), tuple(_join(inner, name) for name in WEIGHT_NAMES))
    return HubNeed(source, match["repo"], match["revision"], files)


def _repo_need(source: str, files: tuple[tuple[str, ...], ...]) -> HubNeed:
    match = _match(source)
    return HubNeed(source, match["repo"], match["revision"], files)


def _match(source: str):
    match = HUB_ID.match(source)
    if match is None:
        raise HubError(f"{source}: not a Hub ID like org/name and not a file next to the preset")
    return match


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _why_unavailable(need: HubNeed) -> Optional[str]:
    """None if every file group of `need` is cached or (online) on the Hub, else the reason, naming the ID."""
    for alternatives in need.files:
        if any(isinstance(try_to_load_from_cache(need.repo, name, revision=need.revision), str)
               for name in alternatives):
            continue
        if constants.HF_HUB_OFFLINE:
            return f"{need.source} is not in the local Hub cache and the Hub is offline (HF_HUB_OFFLINE=1)"
        why = _why_not_on_hub(need, alternatives)
        if why is not None:
            return why
    return None


def _why_not_on_hub(need: HubNeed, alternatives: tuple[str, ...]) -> Optional[str]:
    """Ask the Hub for the first of `alternatives` it has; None if it has one, else the reason."""
    missing = None
    for name in alternatives:
        try:
            _hub_has_file(constants.ENDPOINT, need.repo, need.revision, name)
            return None
        except RemoteEntryNotFoundError:
            missing = name
        except GatedRepoError:
            return f"{need.source}: {need.repo} is gated; accept its terms on the Hub and log in with `hf auth login`"
        except RepositoryNotFoundError:
            return f"{need.source}: repository {need.repo} not found on the Hub"
        except RevisionNotFoundError:
            return f"{need.source}: revision {need.revision} not found in {need.repo}"
        except Exception as error:  # noqa: BLE001 - HTTP errors and the HTTP client's connection errors alike
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            return f"{need.source} could not be checked: the Hub is not reachable ({first_line})"
    return f"{need.source}: {need.repo} has no {missing}"


@lru_cache(maxsize=256)
def _hub_has_file(endpoint: str, repo: str, revision: Optional[str], filename: str) -> bool:
    """One HEAD request; raises the Hub's error if the file is not there (errors are not cached)."""
    url = hf_hub_url(repo, filename, revision=revision)  # on HF_ENDPOINT, the Hub by default
    get_hf_file_metadata(url, timeout=HEAD_TIMEOUT_S, endpoint=endpoint)
    return True
