"""A few labelled test images of a Hub dataset, read from the dataset repo's parquet files.

Hub datasets are stored as parquet (pushed by the `datasets` library, or converted by the Hub): the split's
files are `<config or data>/<split>-NNNNN-of-NNNNN.parquet`, the image column a struct of encoded bytes, the label
an integer, and the schema's "huggingface" metadata holds the features, with the class names of the label. One
shard of the split is enough for a few images: it is fetched with `hf_hub_download` into the Hub cache (the
first time only) and read with pyarrow, one row group at a time.
"""

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.file_download import repo_folder_name
from PIL import Image

from ..errors import HubError


@dataclass(frozen=True)
class HubImage:
    image: Image.Image
    label: int  # the index of its class in the dataset's class names


def split_shard(repo: str, split: str, subset: Optional[str] = None, revision: str = "main") -> Path:
    """The first parquet file of `split` (of configuration `subset`), from the Hub cache, else downloaded.

    Raises:
        HubError: names the dataset and why (not cached while offline, not on the Hub, no such split).
    """
    cached = _cached_snapshot(repo, revision)
    if cached is not None:
        found = _split_files([str(p.relative_to(cached)) for p in cached.rglob("*.parquet")], split, subset)
        if found:
            return cached / found[0]
    if constants.HF_HUB_OFFLINE:
        raise HubError(f"dataset {repo}: its {split} split is not in the local Hub cache and the Hub is offline "
                       "(HF_HUB_OFFLINE=1)")
    try:
        found = _split_files(HfApi().list_repo_files(repo, repo_type="dataset", revision=revision), split, subset)
        if not found:
            raise HubError(f"dataset {repo}: no parquet file of split {split!r}"
                           + (f" in configuration {subset!r}" if subset else ""))
        return Path(hf_hub_download(repo, found[0], repo_type="dataset", revision=revision))
    except HubError:
        raise
    except Exception as error:  # noqa: BLE001 - the Hub client's HTTP and connection errors alike
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HubError(f"dataset {repo} could not be read from the Hub ({first_line})") from None


def _cached_snapshot(repo: str, revision: str) -> Optional[Path]:
    """The snapshot folder of `repo` at `revision` in the Hub cache (as huggingface_hub lays it out), if any."""
    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="dataset")
    ref = folder / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = folder / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def _split_files(paths, split: str, subset: Optional[str]) -> list[str]:
    """The parquet files of a split, sorted: `.../<split>-*.parquet` (or `<config>/<split>/*.parquet`, the Hub's
    parquet conversion), inside a folder named `subset` when one is given."""
    found = []
    for path in paths:
        parts = path.split("/")
        if not path.endswith(".parquet") or (subset and subset not in parts[:-1]):
            continue
        if parts[-1].startswith((f"{split}-", f"{split}.")) or (len(parts) > 1 and parts[-2] == split):
            found.append(path)
    return sorted(found)


def read_images(shard: Path, count: int) -> list[HubImage]:
    """`count` images spread evenly over the shard's rows, with their labels."""
    import pyarrow.parquet as pq

    reader = pq.ParquetFile(shard)
    image_column, label_column, _ = _columns(reader, shard)
    rows = reader.metadata.num_rows
    wanted = sorted({min(rows - 1, (2 * i + 1) * rows // (2 * count)) for i in range(count)}) if rows else []
    images, start = [], 0
    for group in range(reader.num_row_groups):
        size = reader.metadata.row_group(group).num_rows
        inside = [row - start for row in wanted if start <= row < start + size]
        if inside:
            table = reader.read_row_group(group, columns=[image_column, label_column]).take(inside)
            for cell, label in zip(table.column(image_column).to_pylist(), table.column(label_column).to_pylist()):
                image = Image.open(io.BytesIO(cell["bytes"])).convert("RGB")
                images.append(HubImage(image, int(label)))
        start += size
    return images


def class_names(shard: Path) -> list[str]:
    """The label's class names, from the features the parquet file carries."""
    import pyarrow.parquet as pq

    return _columns(pq.ParquetFile(shard), shard)[2]


def _columns(reader, shard: Path) -> tuple[str, str, list[str]]:
    """The image column, the label column and its class names, as the `datasets` features describe them."""
    metadata = reader.schema_arrow.metadata or {}
    try:
        features = json.loads(metadata[b"huggingface"])["info"]["features"]
    except (KeyError, ValueError):
        raise HubError(f"{shard.name}: no `datasets` features in the parquet file; cannot tell the image and "
                       "label columns") from None
    images = [name for name, feature in features.items() if feature.get("_type") == "Image"]
    labels = [name for name, feature in features.items() if feature.get("_type") == "ClassLabel"]
    if not images or not labels:
        raise HubError(f"{shard.name}: needs an Image and a ClassLabel column; has {', '.join(features)}")
    return images[0], labels[0], list(features[labels[0]].get("names", []))
