"""The app leaves nothing behind: the real app (python app.py, in a subprocess) removes its temporary root on
SIGTERM and on SIGINT, and at start removes the roots of processes that died, keeping roots of running processes
and folders coremerge did not write; a normal exit removes the root too; figures do not pile up over merges."""

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure

from coremerge import METHODS
from coremerge.presets import find_preset
from coremerge.webapp import handlers
from coremerge.webapp.cache import ResultCache
from coremerge.webapp.housekeeping import OWNER_RECORD, PREFIX, process_started, remove_stale_roots

ROOT = Path(__file__).resolve().parent.parent
DIGITS = find_preset("digits")


def environment(tmp: Path, port: int = 0) -> dict:
    return {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
            "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def root_record(folder: Path, pid: int, started=None) -> Path:
    folder.mkdir()
    (folder / OWNER_RECORD).write_text(json.dumps({"pid": pid, "started": started}))
    (folder / "request-x").mkdir()
    return folder


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def roots_of(tmp: Path, pid: int) -> list[Path]:
    return [p for p in tmp.glob(PREFIX + "*") if (p / OWNER_RECORD).exists()
            and json.loads((p / OWNER_RECORD).read_text())["pid"] == pid]


def start_app(tmp: Path) -> tuple[subprocess.Popen, Path]:
    """python app.py, until its page answers; returns the process and its root."""
    port = free_port()
    app = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=environment(tmp, port),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert app.poll() is None, app.stderr.read()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        pytest.fail("the app did not answer within 300 s")
    roots = roots_of(tmp, app.pid)
    assert len(roots) == 1 and roots[0].is_dir()
    return app, roots[0]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_real_app_removes_stale_roots_at_start_and_its_own_on_a_signal(tmp_path, stop):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    stale = root_record(tmp / f"{PREFIX}dead", dead_pid())
    running = root_record(tmp / f"{PREFIX}running", os.getpid(), process_started(os.getpid()))
    foreign = tmp / f"{PREFIX}not-ours"  # no owner record: not coremerge's to remove
    foreign.mkdir()
    (foreign / "data.txt").write_text("keep me")
    app, root = start_app(tmp)
    try:
        assert not stale.exists()
        assert (running / "request-x").is_dir() and (foreign / "data.txt").read_text() == "keep me"
        app.send_signal(stop)
        app.wait(timeout=60)
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
    assert not root.exists()
    assert running.is_dir() and foreign.is_dir()


def test_a_normal_exit_removes_the_root(tmp_path):
    done = subprocess.run([sys.executable, "-c", "from coremerge.webapp import handlers; print(handlers.CACHE.root)"],
                          cwd=ROOT, env=environment(tmp_path), capture_output=True, text=True, timeout=300)
    root = Path(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0 and root.parent == tmp_path and root.name.startswith(PREFIX)
    assert not root.exists()


def test_stale_roots_go_and_the_rest_stays(tmp_path):
    stale = root_record(tmp_path / f"{PREFIX}dead", dead_pid())
    reused = root_record(tmp_path / f"{PREFIX}reused", os.getpid(), "1")  # this pid, but a process started earlier
    running = root_record(tmp_path / f"{PREFIX}running", os.getppid())  # the parent runs, start time not recorded
    broken = tmp_path / f"{PREFIX}broken"
    broken.mkdir()
    (broken / OWNER_RECORD).write_text("not json")
    link = tmp_path / f"{PREFIX}link"
    link.symlink_to(stale)
    other = tmp_path / "other-dead"
    root_record(other, dead_pid())
    assert remove_stale_roots(tmp_path) == [stale]  # this process's own pid is never taken for stale
    assert not stale.exists() and reused.is_dir() and running.is_dir() and broken.is_dir() and other.is_dir()
    assert link.is_symlink()


def test_figures_do_not_pile_up_over_merges(tmp_path, monkeypatch):
    monkeypatch.setattr(handlers, "CACHE", ResultCache(capacity=4, root=tmp_path / "cache"))
    values = [METHODS["ta"].defaults().get(p.name, p.default) for p in handlers.PARAMETERS]
    rows = [[a.source, a.name, a.weight] for a in DIGITS.adapters[:2]]

    def live_figures() -> int:
        gc.collect()
        return sum(isinstance(o, Figure) for o in gc.get_objects())

    open_before, live_before = len(plt.get_fignums()), live_figures()
    for alpha in (0.5, 0.6, 0.5, 0.6):  # two merges, two served from the cache
        outputs = handlers.merge_and_compare("digits", rows, "ta", "core", alpha, False, None, "", None, None,
                                             lambda fraction, desc=None: None, *values)
        assert isinstance(outputs[5], Figure) and isinstance(outputs[6], Figure)
        del outputs
    assert len(plt.get_fignums()) == open_before
    assert live_figures() <= live_before


def test_a_forked_worker_leaves_the_apps_root_alone(tmp_path):
    """ZeroGPU forks workers from the app: their exit (or a signal to them) must not remove the app's root."""
    script = (
        "import os, signal, sys\n"
        "from coremerge.webapp.cache import ResultCache\n"
        "from coremerge.webapp.housekeeping import remove_on_signals\n"
        "root = ResultCache().root\n"
        "remove_on_signals(root)\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "_, status = os.waitpid(child, 0)\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    sys.exit(0)\n"
        "os.waitpid(child, 0)\n"
        "print(root, root.is_dir(), os.WIFSIGNALED(status))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environment(tmp_path), capture_output=True,
                          text=True, timeout=300)
    root, alive, signalled = done.stdout.split()
    assert done.returncode == 0 and alive == "True" and signalled == "True"  # the child died of SIGTERM, root kept
    assert not Path(root).exists()  # and the app's own exit removed it
