"""Each merge request has a time budget, and merges take the one merge slot only once their rows are checked.

The merge event runs several requests at once (the checks: fetching Hub IDs, unpacking uploads, reading every
adapter's config and tensor index); only the merge, its explanation and its side by side hold `MERGE_SLOT`, one
at a time. A request that waits for the slot, or works, past its budget stops at its next step with one line;
the caller removes its folder, so nothing half-written is kept.
"""

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..errors import CoreMergeError

REQUEST_SECONDS = 600.0  # per merge request, from its start to the zip: a first comparison may load a model and use
# ZeroGPU for its 300 s at most (workflow.GPU_SECONDS)
MERGE_SLOT = threading.BoundedSemaphore(1)  # merges (merge, explain, compare, package) run one at a time


def _no_progress(fraction: float, desc: str = "") -> None:
    pass


@dataclass
class Budget:
    """A progress callback that also stops the request once its time is up (it pickles, for ZeroGPU's worker)."""

    seconds: float = REQUEST_SECONDS
    progress: Callable = _no_progress
    deadline: float = field(default=0.0)

    def __post_init__(self):
        if not self.deadline:
            self.deadline = time.monotonic() + self.seconds

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def check(self, doing: str) -> None:
        """Raises CoreMergeError if the budget is spent; `doing` says what the request was doing."""
        if self.remaining() <= 0:
            raise CoreMergeError(f"this merge took longer than the {self.seconds:g} s a request may take (stopped "
                                 f"while {doing}); nothing was kept. Try fewer adapters or prompts")

    def __call__(self, fraction: float, desc: str = "") -> None:
        self.check(desc or "merging")
        self.progress(fraction, desc=desc)


@contextmanager
def merge_slot(budget: Budget) -> Iterator[None]:
    """Hold the merge slot, waiting at most for the rest of the budget."""
    slot = MERGE_SLOT
    budget.progress(0.0, desc="waiting for another merge to finish")
    if not slot.acquire(timeout=max(0.0, budget.remaining())):
        raise CoreMergeError(f"the server is busy: other merges held it for the whole {budget.seconds:g} s this "
                             "request may take; nothing was kept. Try again in a minute")
    try:
        yield
    finally:
        slot.release()
