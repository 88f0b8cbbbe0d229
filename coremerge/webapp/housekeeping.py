"""The app's temporary root (`coremerge-app-*`, every request's folder lies in it): made with a record of its
owner process, removed when the app exits (normally, on SIGTERM or on SIGINT), and, at the next start, removed if
its owner died without removing it. A folder without coremerge's owner record is never removed.
"""

import atexit
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Optional

PREFIX = "coremerge-app-"
OWNER_RECORD = ".coremerge-owner.json"  # {"pid": ..., "started": the process's start time, as /proc says}


def process_started(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux /proc), None where that cannot be read: with the
    pid it tells a process from a later one that got the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def make_root(parent: Optional[Path] = None) -> Path:
    """A new root under `parent` (the system's temp folder by default) holding its owner record; stale roots of
    dead processes there are removed first."""
    remove_stale_roots(parent)
    root = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
    (root / OWNER_RECORD).write_text(json.dumps({"pid": os.getpid(), "started": process_started(os.getpid())}))
    return root


def owner_of(folder: Path) -> Optional[dict]:
    """The folder's owner record, or None if it has none coremerge wrote."""
    try:
        record = json.loads((folder / OWNER_RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int) or record["pid"] <= 0:
        return None
    return record


def is_alive(record: dict) -> bool:
    """The owner process still runs (the same process: not another that got its pid later)."""
    pid = record["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it runs
    started = record.get("started")
    return started is None or process_started(pid) in (None, started)


def remove_stale_roots(parent: Optional[Path] = None) -> list[Path]:
    """Remove every `coremerge-app-*` root under `parent` whose owner process is gone; returns what was removed.
    Links, files and folders without an owner record are left alone."""
    removed = []
    for folder in sorted(Path(parent or tempfile.gettempdir()).glob(PREFIX + "*")):
        if folder.is_symlink() or not folder.is_dir():
            continue
        record = owner_of(folder)
        if record is not None and record["pid"] != os.getpid() and not is_alive(record):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _remove_if_mine(root: Path, owner: int) -> None:
    """Remove `root` in the process that made it only: a forked worker (ZeroGPU's) inherits the exit and signal
    handlers, and must not remove the root of the app that still runs."""
    if os.getpid() == owner:
        shutil.rmtree(root, ignore_errors=True)


def remove_at_exit(root: Path) -> None:
    """Remove `root` when the interpreter exits normally."""
    atexit.register(_remove_if_mine, root, os.getpid())


def remove_on_signals(root: Path, signals=(signal.SIGTERM, signal.SIGINT)) -> None:
    """Remove `root` on SIGTERM and SIGINT, then do what the signal did before (SIGINT: KeyboardInterrupt, which
    stops Gradio's server; SIGTERM: end the process). Only from the main thread, where Python takes signals."""
    if threading.current_thread() is not threading.main_thread():
        return
    owner = os.getpid()
    for number in signals:
        previous = signal.getsignal(number)

        def handler(signum, frame, previous=previous):
            _remove_if_mine(root, owner)
            if callable(previous):
                previous(signum, frame)
            elif previous != signal.SIG_IGN:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        signal.signal(number, handler)
