"""A Hub cache folder laid out as huggingface_hub lays it out (its "Manage the cache" guide, file_download.py):

    models--<org>--<name>/blobs/<etag>                  the file's bytes, named by its ETag
    models--<org>--<name>/refs/main                     the commit that `main` points to
    models--<org>--<name>/snapshots/<commit>/<path>     a relative symlink to ../../blobs/<etag>
    models--<org>--<name>/.no_exist/<commit>/<path>     an empty file: the Hub said 404 for it (so an offline
                                                         look-up knows it is missing, not merely uncached)

The ETag of an LFS file (weights, tokenizer.model) is its sha256; of any other file, its git blob sha1.
"""

import hashlib
import os
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin", ".model", ".pt", ".parquet")


def etag(path: Path, data: bytes) -> str:
    if path.suffix in LFS_SUFFIXES:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_repo(cache: Path, repo_id: str, files: dict[str, Path], kind: str = "models", commit: str = COMMIT,
             absent: tuple[str, ...] = ()) -> Path:
    """Put `files` ({path in the repo: local file}) into the cache as repo `repo_id` at `commit`, with the files
    a library looked for and did not find (`absent`); returns the snapshot folder."""
    repo = Path(cache) / f"{kind}--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir(exist_ok=True)
    snapshot = repo / "snapshots" / commit
    for inner, source in files.items():
        data = Path(source).read_bytes()
        blob = repo / "blobs" / etag(Path(inner), data)
        blob.write_bytes(data)
        target = snapshot / inner
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(os.path.relpath(blob, target.parent))
    for inner in absent:
        marker = repo / ".no_exist" / commit / inner
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return snapshot


def folder_files(folder: Path) -> dict[str, Path]:
    """Every file under `folder`, by its path inside it (what save_pretrained wrote becomes a repo)."""
    return {str(p.relative_to(folder)): p for p in sorted(Path(folder).rglob("*")) if p.is_file()}
