"""The app under ZeroGPU's process model, on a stand-in for `spaces.GPU` with the same semantics.

On ZeroGPU, `spaces.GPU` (spaces/zero/wrappers.py, `regular_function_wrapper`) runs each call in a worker
process forked from the main one: the arguments go to it through a multiprocessing queue (pickled), the
result comes back the same way; a `gr.Error` raised in the worker reaches the page as it is, any other
exception only as its class name ("ZeroGPU worker error"); and the worker is reused only while the GPU stays
allocated to it, so whatever it loads or caches is, on most clicks, lost. The stand-in below forks a new
worker for every call (that worst case, always), with the same pickling and the same error handling.
"""

import importlib
import multiprocessing
import os
import pickle
from concurrent.futures import ThreadPoolExecutor

import gradio as gr
import pytest
import spaces
from spaces.zero.gradio import error as zerogpu_error

from coremerge.comparison import runners
from coremerge.errors import CoreMergeError
from coremerge.presets import find_preset
from coremerge.webapp import handlers, workflow
from coremerge.webapp.cache import ResultCache

FORK = multiprocessing.get_context("fork")


def _worker(task, arguments, results) -> None:
    args, kwargs = pickle.loads(arguments.recv_bytes())

    def run():  # in a new thread of the worker, as the wrapper's thread_wrapper runs it
        try:
            return ("ok", task(*args, **kwargs), None)
        except Exception as failure:  # noqa: BLE001 - as the wrapper's exception_result
            return ("error", failure if isinstance(failure, gr.Error) else None, type(failure).__name__)

    with ThreadPoolExecutor() as executor:
        result = executor.submit(run).result()
    try:
        payload = pickle.dumps(result)
    except Exception as failure:  # noqa: BLE001 - an unpicklable result is the wrapper's PicklingError
        payload = pickle.dumps(("error", None, type(failure).__name__))
    results.send_bytes(payload)


def fork_per_call(durations: list):
    """A stand-in for `spaces.GPU(duration=...)`: a new forked worker per call; arguments and result pickled."""

    def decorator(task=None, *, duration=None, size=None):
        def wrap(task):
            def gradio_handler(*args, **kwargs):
                durations.append(duration(*args, **kwargs) if callable(duration) else duration)
                payload = pickle.dumps((args, kwargs))  # the wrapper's arg_queue.put pickles them
                receive_arguments, send_arguments = FORK.Pipe(duplex=False)
                receive_result, send_result = FORK.Pipe(duplex=False)
                worker = FORK.Process(target=_worker, args=(task, receive_arguments, send_result), daemon=True)
                worker.start()
                send_result.close()
                send_arguments.send_bytes(payload)
                try:
                    kind, value, error_class = pickle.loads(receive_result.recv_bytes())
                except EOFError:  # the worker died without an answer
                    raise zerogpu_error("ZeroGPU worker error", "GPU task aborted") from None
                finally:
                    worker.join()
                if kind == "ok":
                    return value
                if value is not None:
                    raise value
                raise zerogpu_error("ZeroGPU worker error", error_class)

            return gradio_handler

        return wrap(task) if callable(task) else wrap

    return decorator


def logged(log, what, function):
    """`function`, writing "`what` <pid>" to `log` on each call (to see which process ran it)."""
    def run(*args, **kwargs):
        with open(log, "a") as out:
            out.write(f"{what} {os.getpid()}\n")
        return function(*args, **kwargs)
    return run


@pytest.fixture
def zerogpu(monkeypatch, tmp_path):
    """handlers re-imported under the stand-in; every model load, merge and comparison logged with its process."""
    durations, log = [], tmp_path / "processes.log"
    monkeypatch.setattr(spaces, "GPU", fork_per_call(durations))
    monkeypatch.setattr(runners, "build_runner", logged(log, "load", runners.build_runner))
    monkeypatch.setattr(workflow, "merge_to_folder", logged(log, "merge", workflow.merge_to_folder))
    monkeypatch.setattr(workflow, "compare_classification", logged(log, "compare", workflow.compare_classification))
    runners.runner_for.cache_clear()  # as in a freshly started app
    importlib.reload(handlers)
    monkeypatch.setattr(handlers, "CACHE", ResultCache(capacity=8, root=tmp_path / "cache"))
    yield durations, log
    monkeypatch.undo()
    importlib.reload(handlers)
    runners.runner_for.cache_clear()


def merge(alpha: float, rows=None):
    preset = find_preset("digits")
    rows = rows or [[a.source, a.name, a.weight] for a in preset.adapters[:3]]
    values = [p.default for p in handlers.PARAMETERS]
    return handlers.merge_and_compare("digits", rows, "ta", "core", alpha, False, None, "", None, None, gr.Progress(), *values)


def processes(log, what) -> list[int]:
    return [int(line.split()[1]) for line in log.read_text().splitlines() if line.split()[0] == what]


def test_three_merges_load_the_base_model_once_and_run_only_the_comparison_in_the_worker(zerogpu):
    durations, log = zerogpu
    main = os.getpid()
    outputs = [merge(alpha) for alpha in (0.3, 0.5, 0.7)]

    assert processes(log, "load") == [main]  # once, in the main process, where the worker inherits it
    assert processes(log, "merge") == [main] * 3  # the merge spends no GPU time
    workers = processes(log, "compare")
    assert len(set(workers)) == 3 and main not in workers  # each comparison in its own forked worker
    for summary, comparison, accuracy, *_ in outputs:  # results came back through pickle, complete
        assert all(f"<th>{name}</th>" in comparison for name in ("Base", "Merged"))
        assert accuracy["visible"] and "Average normalized accuracy of the merge" in summary
    assert len(durations) == 3 and all(isinstance(d, int) and 15 <= d <= 300 for d in durations)


def test_a_failure_in_the_worker_reaches_the_page_as_one_line(zerogpu, monkeypatch):
    main = os.getpid()

    def failing(*args, **kwargs):
        if os.getpid() != main:
            raise failure
        return compare(*args, **kwargs)

    compare = workflow.compare_classification
    monkeypatch.setattr(workflow, "compare_classification", failing)
    for failure, shown in [
        (CoreMergeError("comparison: the merged adapter does not fit the base model"),
         "comparison: the merged adapter does not fit the base model"),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nGPU 0 has a total capacity of 40 GiB"),
         handlers.INTERNAL_ERROR),  # one neutral line: no class name, no "unexpected" (the details go to the log)
    ]:
        with pytest.raises(gr.Error) as raised:
            merge(0.4)
        assert raised.value.message == shown
        assert handlers.CACHE.folders() == []  # nothing half-written is kept


def test_the_gpu_time_asked_for_grows_with_the_work():
    from coremerge.webapp.workflow import GPU_SECONDS, ComparisonJob, comparison_seconds

    def seconds(preset_name, adapters=3, prompts=3, parameters=1_100_000_000):
        preset = find_preset(preset_name)
        job = ComparisonJob(preset, ("a",) * adapters, ("org/a",) * adapters, (None,) * adapters, "/tmp/merged",
                            ("p",) * prompts, parameters)
        return comparison_seconds(job, gr.Progress())

    text = seconds("tinyllama-tasks")
    assert seconds("tinyllama-tasks", prompts=6) > text and seconds("tinyllama-tasks", adapters=6) > text
    assert seconds("tinyllama-tasks", parameters=100_000_000) < text
    assert seconds("sd15-styles", parameters=860_000_000) < seconds("sdxl-styles", parameters=2_600_000_000)
    assert seconds("digits", parameters=100_000) == GPU_SECONDS[0] + 2 * 4  # tiny: the floor and adapter loads
    assert seconds("sdxl-styles", adapters=10, prompts=12, parameters=2_600_000_000) == GPU_SECONDS[1]
