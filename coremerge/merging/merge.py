"""Merge loaded adapters module by module, reading each module's factors only when it is merged."""

import math
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional, Sequence

import numpy
import torch
from threadpoolctl import threadpool_limits

from ..errors import CoreMergeError
from ..formats.adapter import Adapter, MergedModule, TaskFactors, TaskStacks, TensorReader
from .linalg import squared_norms
from .options import MergeOptions
from .spaces import check_finite_scale, merge_module, to_lora

BYTES_PER_READ = 64 * 2**20  # files are reopened after this much so that their memory maps do not pile up
WORKERS = 2  # modules merged at once (torch releases the GIL)


@dataclass
class Timings:
    """Seconds spent per stage (wall time; reading, which the merge workers do side by side, counts as its
    total divided by the number of workers)."""

    loading: float = 0.0
    merging: float = 0.0
    writing: float = 0.0


def module_generator(seed: int, name: str) -> torch.Generator:
    """The seeded randomness of one module (dare): the same seed and module give the same mask."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


def check_device(device: str) -> str:
    """The device a merge computes on: "cpu", or "cuda" / "cuda:<index>" when CUDA is present."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise CoreMergeError(f"device {device!r}: not a torch device; use cpu or cuda") from None
    if kind not in ("cpu", "cuda"):
        raise CoreMergeError(f"device {device!r}: merges run on cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise CoreMergeError(f"device {device!r}: CUDA is not available on this machine; use cpu")
    return device


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads, and numpy's BLAS threads (`linalg.gram`), set to `count` for the block.

    The modules are merged `workers` at a time; each op on their small matrices is too short to share
    among threads, and threads that wait for each other (on a loaded machine, for a core) cost more
    than the op: reading the factors took ten times longer with two threads than with one.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        with threadpool_limits(limits=count, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


def module_names(adapters: Sequence[Adapter]) -> list[str]:
    return sorted({name for adapter in adapters for name in adapter.modules})


def read_chunks(adapters: Sequence[Adapter], names: Sequence[str],
                limit: Optional[int] = None) -> Iterator[list[str]]:
    """The module names in runs that read at most `limit` (BYTES_PER_READ) bytes of factors, one module at least.

    Each run is read with the files opened once: opening parses the whole safetensors header, which for
    files of a thousand small modules cost more than reading them.
    """
    limit = BYTES_PER_READ if limit is None else limit
    chunk: list[str] = []
    size = 0
    for name in names:
        spec_bytes = sum(
            (math.prod(spec.a_shape) + math.prod(spec.b_shape)) * adapter.dtype.itemsize
            for adapter in adapters if (spec := adapter.modules.get(name)) is not None
        )
        if chunk and size + spec_bytes > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(name)
        size += spec_bytes
    if chunk:
        yield chunk


def read_stacked(adapters: Sequence[Adapter], readers: Sequence[TensorReader], users: Sequence[int], name: str,
                 weights: Sequence[float]) -> tuple[list[TaskFactors], TaskStacks]:
    """The module's factors of each adapter that targets it (`users`), read into one A stack and one B stack.

    The stored factors are concatenated first and upcast in one pass (exact), then B~ = s B is scaled column by
    column; each task's norm bound comes from the squared norms of the stacks' rows (A) and columns (B).
    """
    stored = [adapters[i].read_stored(readers[i], name) for i in users]
    a_stack = torch.cat([a for a, _, _ in stored]).to(torch.float64)  # (R, n)
    scalings = torch.tensor([scaling for _, b, scaling in stored for _ in range(b.shape[1])], dtype=torch.float64)
    b_stack = torch.cat([b for _, b, _ in stored], dim=1).to(torch.float64).mul_(scalings)  # (m, R)
    # per task ||B~_t||_F^2 and ||A~_t||_F^2: sums of the stacks' squared column / row norms over its rank block
    starts = numpy.cumsum([0] + [a.shape[0] for a, _, _ in stored[:-1]])
    a_squares = numpy.add.reduceat(squared_norms(a_stack, dim=1), starts)
    b_squares = numpy.add.reduceat(squared_norms(b_stack, dim=0), starts)
    tasks, start = [], 0
    for i, (a, _, _), a_square, b_square in zip(users, stored, a_squares, b_squares):
        stop = start + a.shape[0]
        bound = math.sqrt(b_square) * math.sqrt(a_square)
        adapters[i].check_finite(readers[i], name, bound)
        tasks.append(TaskFactors(a=a_stack[start:stop], b=b_stack[:, start:stop], weight=weights[i],
                                 source=adapters[i].source, known_bound=bound))
        start = stop
    return tasks, TaskStacks(a=a_stack, b=b_stack)


def merge_adapters(
    adapters: Sequence[Adapter],
    options: MergeOptions,
    timings: Optional[Timings] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    factor_dtype: torch.dtype = torch.float64,
    workers: int = WORKERS,
    device: str = "cpu",
    export: Optional[Callable[[MergedModule], object]] = None,
) -> Iterator[MergedModule]:
    """Merge module by module; a module counts only the adapters that target it (SPEC 1).

    `workers` threads each read a module's factors and merge it (torch releases the GIL, and the many
    small SVDs use one core each); the calling thread only collects the results in order. Reading in the
    workers, not in a thread of its own, keeps to one Python thread per core: with a third thread, sets of
    many small modules (SDXL's thousand) spent their time handing the interpreter lock around.

    `factor_dtype` is the precision of the final products that give the written factors. `device` is where
    the spaces and methods compute ("cuda" makes the full-space and KnOTS baselines practical); still in
    float64, and the written factors come back to the CPU. `export`, when given, runs on each merged module
    in its worker thread, so that the cast to the output dtype and its checks overlap the other modules'
    merging instead of waiting for the main thread; its result is the module's `exported`.

    Yields:
        One `MergedModule` per module, in name order.
    """
    weights = options.weights_for(len(adapters))
    timings = timings or Timings()
    names = module_names(adapters)
    seed = int(options.params.get("seed", 0))
    started, consumer, loaded_before = time.perf_counter(), 0.0, timings.loading

    def merge_one(name: str, users: list[int], tasks: list, stacks: Optional[TaskStacks]) -> MergedModule:
        check_finite_scale(name, tasks, options.alpha)
        if device != "cpu":
            tasks, stacks = [replace(task, a=task.a.to(device), b=task.b.to(device)) for task in tasks], None
        try:
            update = merge_module(tasks, options, module_generator(seed, name), stacks)
            lora_b, lora_a = (factor.cpu() for factor in to_lora(update, options.rank, factor_dtype))
        except (torch.linalg.LinAlgError, RuntimeError) as error:  # e.g. an SVD that does not converge
            raise CoreMergeError(f"module {name}: the merge failed numerically ({str(error).splitlines()[0]})")
        template = adapters[users[0]].modules[name]
        module = MergedModule(name, template, lora_a, lora_b, {i: adapters[i].modules[name].rank for i in users})
        return module if export is None else replace(module, exported=export(module))

    workers = max(1, min(workers, len(names)))

    reading_seconds: list[float] = []  # per module, appended by the workers

    def read_and_merge(readers: Sequence[TensorReader], name: str) -> MergedModule:
        clock = time.perf_counter()
        users = [i for i, adapter in enumerate(adapters) if name in adapter.modules]
        tasks, stacks = read_stacked(adapters, readers, users, name, weights)
        reading_seconds.append(time.perf_counter() - clock)
        return merge_one(name, users, tasks, stacks)

    def in_order() -> Iterator[MergedModule]:
        pending: deque = deque()
        with torch_threads(max(1, torch.get_num_threads() // workers)), ThreadPoolExecutor(workers) as pool:
            for chunk in read_chunks(adapters, names):
                with ExitStack() as stack:  # the chunk's files stay open until its modules are merged
                    readers = [stack.enter_context(adapter.open()) for adapter in adapters]
                    try:
                        for name in chunk:
                            pending.append(pool.submit(read_and_merge, readers, name))
                            if len(pending) > workers:
                                yield pending.popleft().result()
                        while pending:
                            yield pending.popleft().result()
                    finally:  # on a failure, no worker may still be reading when the files close
                        for future in pending:
                            future.cancel()
                        wait(pending)
        timings.loading += sum(reading_seconds) / workers  # the workers read side by side

    for done, module in enumerate(in_order(), start=1):
        clock = time.perf_counter()
        yield module
        if progress is not None:
            progress(done, len(names))
        consumer += time.perf_counter() - clock
    timings.merging += time.perf_counter() - started - (timings.loading - loaded_before) - consumer
