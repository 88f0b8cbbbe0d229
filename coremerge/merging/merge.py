"""Merge loaded adapters module by module (same-shaped small modules in batches), reading each module's factors only
when it is merged."""

import math
import time
import zlib
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional, Sequence

import numpy
import torch
from threadpoolctl import threadpool_limits

from ..errors import CoreMergeError
from ..formats.adapter import Adapter, MergedModule, TaskFactors, TaskStacks, TensorReader
from .linalg import NotUniform, squared_norms
from .options import MergeOptions
from .spaces import check_finite_scale, merge_batch, merge_module, to_lora, to_loras

BYTES_PER_READ = 64 * 2**20  # files are reopened after this much so that their memory maps do not pile up
BATCH_BYTES = 16 * 2**20  # float64 factors of the same-shaped modules merged together (core space on the CPU)
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


def module_batches(adapters: Sequence[Adapter], names: Sequence[str], limit: Optional[int] = None) -> list[list[str]]:
    """`names` in batches of same-shaped modules (the same adapters target them, with the same ranks and shapes)
    whose float64 factors take at most `limit` (BATCH_BYTES) bytes, one module at least; the batches in the order
    of their first module. Merged together, a batch's small modules cost one call per step instead of one each.
    """
    limit = BATCH_BYTES if limit is None else limit
    batches: list[list[str]] = []
    last_batch: dict[tuple, tuple[list[str], int]] = {}  # signature -> its latest batch and that batch's bytes
    for name in names:
        specs = [(i, adapter.modules[name]) for i, adapter in enumerate(adapters) if name in adapter.modules]
        signature = tuple((i, spec.rank, spec.shape) for i, spec in specs)
        size = sum(spec.rank * sum(spec.shape) for _, spec in specs) * 8
        batch, used = last_batch.get(signature, (None, 0))
        if batch is None or used + size > limit:
            batch, used = [], 0
            batches.append(batch)
        batch.append(name)
        last_batch[signature] = (batch, used + size)
    return batches


def read_batch(adapters: Sequence[Adapter], readers: Sequence[TensorReader], users: Sequence[int],
               names: Sequence[str], weights: Sequence[float]) -> tuple[list[list[TaskFactors]], TaskStacks]:
    """The factors of same-shaped modules (`names`, each targeted by the adapters `users`), read into one A stack
    (G, R, n) and one B stack (G, m, R) with a leading module dimension; per module, its tasks (views of them).

    The stored factors are concatenated first and upcast in one pass (exact), then B~ = s B is scaled column by
    column; each task's norm bound comes from the squared norms of the stacks' rows (A) and columns (B).

    Raises:
        AdapterFormatError: a factor with NaN or Inf entries (the first such module of the batch).
    """
    stored = [[adapters[i].read_stored(readers[i], name) for i in users] for name in names]
    a_stack = _stacked_concatenations([[a for a, _, _ in module] for module in stored], dim=0).to(torch.float64)
    b_stack = _stacked_concatenations([[b for _, b, _ in module] for module in stored], dim=1).to(torch.float64)
    scalings = [[scaling for _, b, scaling in module for _ in range(b.shape[1])] for module in stored]
    b_stack.mul_(torch.tensor(scalings, dtype=torch.float64).unsqueeze(-2))
    # per task ||B~_t||_F^2 and ||A~_t||_F^2: sums of the stacks' squared column / row norms over its rank block
    starts = numpy.cumsum([0] + [a.shape[0] for a, _, _ in stored[0][:-1]])
    a_squares = numpy.add.reduceat(squared_norms(a_stack, dim=-1), starts, axis=-1)  # (G, T)
    b_squares = numpy.add.reduceat(squared_norms(b_stack, dim=-2), starts, axis=-1)
    tasks = []
    for g, name in enumerate(names):
        module_tasks, start = [], 0
        for i, (a, _, _), a_square, b_square in zip(users, stored[g], a_squares[g], b_squares[g]):
            stop = start + a.shape[0]
            bound = math.sqrt(b_square) * math.sqrt(a_square)
            adapters[i].check_finite(readers[i], name, bound)
            module_tasks.append(TaskFactors(a=a_stack[g, start:stop], b=b_stack[g, :, start:stop], weight=weights[i],
                                            source=adapters[i].source, known_bound=bound))
            start = stop
        tasks.append(module_tasks)
    return tasks, TaskStacks(a=a_stack, b=b_stack)


def _stacked_concatenations(pieces: Sequence[Sequence[torch.Tensor]], dim: int) -> torch.Tensor:
    """Each module's pieces concatenated along `dim`, stacked on a new first dimension (one module: no copy more)."""
    concatenations = [torch.cat(list(module), dim=dim) for module in pieces]
    return concatenations[0].unsqueeze(0) if len(concatenations) == 1 else torch.stack(concatenations)


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

    `workers` threads each read a batch of same-shaped modules (`module_batches`; in core space on the CPU,
    else one module) and merge it (torch releases the GIL, and the many small SVDs use one core each); the
    calling thread only collects the results in order. Reading in the workers, not in a thread of its own,
    keeps to one Python thread per core, and batches keep the number of torch calls down: sets of many small
    modules (SDXL's thousand) otherwise spent their time in per-call overhead, handing the interpreter lock
    around.

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

    def merge_one(name: str, tasks: list, stacks: Optional[TaskStacks]) -> tuple[torch.Tensor, torch.Tensor]:
        if device != "cpu":
            tasks, stacks = [replace(task, a=task.a.to(device), b=task.b.to(device)) for task in tasks], None
        try:
            update = merge_module(tasks, options, module_generator(seed, name), stacks)
            return tuple(factor.cpu() for factor in to_lora(update, options.rank, factor_dtype))
        except (torch.linalg.LinAlgError, RuntimeError) as error:  # e.g. an SVD that does not converge
            raise CoreMergeError(f"module {name}: the merge failed numerically ({str(error).splitlines()[0]})")

    def merge_together(names: list[str], tasks: list, stacks: TaskStacks) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The modules' LoRA factors, merged as one batch; module by module if the batch cannot stay one (their
        shapes part on the way) or fails (so that the error names its module)."""
        if len(names) > 1:
            try:
                update = merge_batch(tasks, options, [module_generator(seed, name) for name in names], stacks)
                return to_loras(update, options.rank, factor_dtype)
            except (NotUniform, torch.linalg.LinAlgError, RuntimeError):
                pass
        return [merge_one(name, module_tasks, TaskStacks(a=stacks.a[g], b=stacks.b[g]))
                for g, (name, module_tasks) in enumerate(zip(names, tasks))]

    workers = max(1, min(workers, len(names)))
    batch_limit = BATCH_BYTES if options.space == "core" and device == "cpu" else 0  # else one module at a time

    reading_seconds: list[float] = []  # per batch, appended by the workers

    def read_and_merge(readers: Sequence[TensorReader], batch: list[str]) -> list[MergedModule]:
        clock = time.perf_counter()
        users = [i for i, adapter in enumerate(adapters) if batch[0] in adapter.modules]
        tasks, stacks = read_batch(adapters, readers, users, batch, weights)
        reading_seconds.append(time.perf_counter() - clock)
        for name, module_tasks in zip(batch, tasks):
            check_finite_scale(name, module_tasks, options.alpha)
        merged = []
        for name, (lora_b, lora_a) in zip(batch, merge_together(batch, tasks, stacks)):
            template = adapters[users[0]].modules[name]
            module = MergedModule(name, template, lora_a, lora_b, {i: adapters[i].modules[name].rank for i in users})
            merged.append(module if export is None else replace(module, exported=export(module)))
        return merged

    def in_order() -> Iterator[MergedModule]:
        with torch_threads(max(1, torch.get_num_threads() // workers)), ThreadPoolExecutor(workers) as pool:
            for chunk in read_chunks(adapters, names):
                with ExitStack() as stack:  # the chunk's files stay open until its modules are merged
                    readers = [stack.enter_context(adapter.open()) for adapter in adapters]
                    batches = module_batches(adapters, chunk, batch_limit)
                    batch_of = {name: j for j, batch in enumerate(batches) for name in batch}
                    futures = {j: pool.submit(read_and_merge, readers, batch) for j, batch in enumerate(batches)}
                    try:
                        finished: dict[str, MergedModule] = {}
                        for name in chunk:  # in name order, as their batches finish (a result is let go once taken)
                            if name not in finished:
                                batch_result = futures.pop(batch_of[name]).result()
                                finished.update((module.name, module) for module in batch_result)
                            yield finished.pop(name)
                    finally:  # on a failure, no worker may still be reading when the files close
                        for future in futures.values():
                            future.cancel()
                        wait(futures.values())
        timings.loading += sum(reading_seconds) / workers  # the workers read side by side

    for done, module in enumerate(in_order(), start=1):
        clock = time.perf_counter()
        yield module
        if progress is not None:
            progress(done, len(names))
        consumer += time.perf_counter() - clock
    timings.merging += time.perf_counter() - started - (timings.loading - loaded_before) - consumer
