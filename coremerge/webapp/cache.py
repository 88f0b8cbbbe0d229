"""Identical merges are cached by their inputs; each request works in its own temporary folder.

A request gets a fresh folder under the cache's root. If it fails, the folder is removed at once;
if it succeeds, the folder lives while its result is in the cache and is removed on eviction.
"""

import shutil
import tempfile
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from .housekeeping import make_root, remove_at_exit
from .workflow import MergeOutcome


class ResultCache:
    """The last `capacity` merge outcomes, by request key (least recently used goes first)."""

    def __init__(self, capacity: int = 16, root: Optional[Path] = None):
        self.capacity = capacity
        self.root = Path(root) if root else make_root()  # the app's own: removed at exit (housekeeping)
        if not root:
            remove_at_exit(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._entries: OrderedDict[str, tuple[MergeOutcome, Path]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Optional[MergeOutcome]:
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            return self._entries[key][0]

    @contextmanager
    def workdir(self) -> Iterator[Path]:
        """A new folder for one request; removed if the request raises."""
        folder = Path(tempfile.mkdtemp(prefix="request-", dir=self.root))
        try:
            yield folder
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def put(self, key: str, outcome: MergeOutcome, folder: Path) -> MergeOutcome:
        """Keep an outcome (and its folder) until it is evicted; returns the outcome kept for `key`."""
        with self._lock:
            if key in self._entries:  # two identical requests finished at once: keep the first
                shutil.rmtree(folder, ignore_errors=True)
                return self._entries[key][0]
            self._entries[key] = (outcome, folder)
            while len(self._entries) > self.capacity:
                _, (_, old) = self._entries.popitem(last=False)
                shutil.rmtree(old, ignore_errors=True)
            return outcome

    def folders(self) -> list[Path]:
        """Request folders on disk (for tests: nothing is left behind)."""
        return sorted(p for p in self.root.iterdir() if p.is_dir())
