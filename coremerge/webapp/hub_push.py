"""Push a merged adapter folder to the Hub. The token is passed through, never stored, logged or echoed."""

import re
from pathlib import Path
from typing import Optional

from huggingface_hub import HfApi, constants

from ..errors import CoreMergeError, HubError

REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def check_repo_id(repo_id: str) -> str:
    repo_id = repo_id.strip()
    if not REPO_ID.match(repo_id):
        raise CoreMergeError(f"repository {repo_id!r}: give it as owner/name, e.g. my-name/merged-lora")
    return repo_id


def _without(secret: str, text: str) -> str:
    """`text` with every occurrence of the secret masked (error messages can echo request headers)."""
    return text.replace(secret, "***") if secret else text


def push_folder(folder: Path, repo_id: str, token: str, private: bool = True, endpoint: Optional[str] = None) -> str:
    """Create the model repo (private by default) if needed and upload the folder; returns its URL.

    Raises:
        CoreMergeError: a malformed repo ID or a missing token.
        HubError: the Hub is offline or unreachable, or refused the token or the upload.
    """
    repo_id = check_repo_id(repo_id)
    token = (token or "").strip()
    if not token:
        raise CoreMergeError("Hub token: empty; paste a token with write access (https://huggingface.co/settings/tokens)")
    if constants.HF_HUB_OFFLINE:
        raise HubError(f"push to {repo_id}: the Hub is offline here (HF_HUB_OFFLINE=1); download the zip instead")
    api = HfApi(token=token, endpoint=endpoint)  # endpoint: a private Hub, default huggingface.co
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload merged LoRA (coremerge)")
    except Exception as error:  # noqa: BLE001 - HTTP, connection and validation errors alike: one line, no token
        why = " ".join(str(error).split()) or type(error).__name__  # the Hub's explanation is on later lines
        raise HubError(f"push to {repo_id}: {_without(token, why)}") from None  # no chained error holding the token
    return str(url)
