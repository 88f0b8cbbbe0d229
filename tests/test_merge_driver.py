"""The module-by-module driver: how it reads in chunks and runs its workers does not change the result."""

import torch

from coremerge import MergeOptions, load_adapters, merge_adapters
from coremerge.merging import merge
from coremerge.merging.merge import read_chunks


def test_read_chunks_keep_order_and_the_byte_limit(adapters):
    loaded = load_adapters([str(adapters["plain"]), str(adapters["pattern"])])
    names = merge.module_names(loaded)
    one_module = 4 * 32 * 2 * 4  # a 32 x 32 module's rank-4 factors in float32, from one adapter
    chunks = list(read_chunks(loaded, names, limit=2 * one_module))
    assert [name for chunk in chunks for name in chunk] == names
    assert len(chunks) > 1 and all(chunk for chunk in chunks)
    assert list(read_chunks(loaded, names, limit=0)) == [[name] for name in names]  # at least one module each


def test_chunking_and_workers_do_not_change_the_merge(adapters, monkeypatch):
    loaded = load_adapters([str(adapters["plain"]), str(adapters["rslora"]), str(adapters["pattern"])])
    options = MergeOptions.create(method="tsv")
    threads = torch.get_num_threads()
    reference = {m.name: (m.lora_b, m.lora_a) for m in merge_adapters(loaded, options, workers=1)}
    monkeypatch.setattr(merge, "BYTES_PER_READ", 1)  # every module in its own chunk
    for module in merge_adapters(loaded, options, workers=2):
        b, a = reference.pop(module.name)
        torch.testing.assert_close(module.lora_b @ module.lora_a, b @ a, rtol=0, atol=1e-12)
    assert not reference
    assert torch.get_num_threads() == threads  # the driver's one-thread setting is undone
