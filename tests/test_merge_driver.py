"""The module-by-module driver: how it reads in chunks and runs its workers does not change the result."""

import pytest
import torch

from coremerge import MergeOptions, load_adapters, merge_adapters
from coremerge.formats.adapter import TaskStacks
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


@pytest.mark.parametrize("batch", [1, 2])
def test_stacked_reading_gives_each_adapters_factors_in_one_stack(adapters, batch):
    loaded = load_adapters([str(adapters["plain"]), str(adapters["rslora"]), str(adapters["pattern"])])
    names = [name for name in merge.module_names(loaded) if name.endswith("v_proj")][:batch]  # same shapes, ranks
    users = [0, 1, 2]
    weights = [0.5, -2.0, 3.0]
    with loaded[0].open() as r0, loaded[1].open() as r1, loaded[2].open() as r2:
        readers = [r0, r1, r2]
        batch_tasks, stacks = merge.read_batch(loaded, readers, users, names, weights)
        alone = [[loaded[i].read_factors(readers[i], name, weights[i]) for i in users] for name in names]
    assert stacks.a.dtype == stacks.b.dtype == torch.float64 and len(batch_tasks) == len(names) == batch
    for g, (name, tasks, single_tasks) in enumerate(zip(names, batch_tasks, alone)):
        # the stacks are exactly the concatenated factors, and each task's factors are views of them
        assert torch.equal(stacks.a[g], torch.cat([t.a for t in single_tasks]))
        assert torch.equal(stacks.b[g], torch.cat([t.b for t in single_tasks], dim=1))
        for task, single in zip(tasks, single_tasks):
            assert torch.equal(task.a, single.a) and torch.equal(task.b, single.b) and task.weight == single.weight
            assert task.a.untyped_storage().data_ptr() == stacks.a.untyped_storage().data_ptr()
            assert task.b.untyped_storage().data_ptr() == stacks.b.untyped_storage().data_ptr()
            bound = float(torch.linalg.vector_norm(single.b) * torch.linalg.vector_norm(single.a))
            assert abs(task.norm_bound - bound) <= 1e-14 * bound  # only the summation order differs
        # the core and KnOTS merges read the stacks as they would the concatenation
        module_stacks = TaskStacks(a=stacks.a[g], b=stacks.b[g])
        for space in ("core", "knots"):
            options = MergeOptions.create(method="ties", space=space)
            with_stacks = merge.merge_module(tasks, options, merge.module_generator(0, name), module_stacks)
            concatenated = merge.merge_module(single_tasks, options, merge.module_generator(0, name))
            torch.testing.assert_close(with_stacks.dense(), concatenated.dense(), rtol=1e-12, atol=0)


def test_a_failing_module_stops_the_merge_with_its_own_error_while_other_workers_read(tmp_path, monkeypatch):
    """Workers read the files side by side: when one module fails, the others still reading finish before the
    chunk's files close (closing a file mid-read raised safetensors' "Already borrowed" instead of the error)."""
    from safetensors.torch import save_file

    from coremerge.errors import AdapterFormatError

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(40):
        for part, shape in (("A", (4, 64)), ("B", (64, 4))):
            tensors[f"base_model.model.layers.{layer}.proj.lora_{part}.weight"] = torch.randn(*shape, generator=g)
    clean = tmp_path / "clean"
    clean.mkdir()
    save_file(tensors, clean / "adapter_model.safetensors")
    broken = tmp_path / "broken"
    broken.mkdir()
    tensors["base_model.model.layers.25.proj.lora_B.weight"][3, 1] = float("nan")
    save_file(tensors, broken / "adapter_model.safetensors")
    config = '{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["proj"]}'
    for folder in (clean, broken):
        (folder / "adapter_config.json").write_text(config)
    loaded = load_adapters([str(clean), str(broken)])
    key = "base_model.model.layers.25.proj.lora_B.weight"
    monkeypatch.setattr(merge, "BATCH_BYTES", 0)  # module by module, so that workers read while another fails
    for _ in range(20):  # the race needs a worker mid-read at the failure: repeat
        merged = []
        with pytest.raises(AdapterFormatError) as caught:
            for module in merge_adapters(loaded, MergeOptions.create(method="tsv"), workers=2):
                merged.append(module.name)
        assert str(caught.value) == f"{broken}: tensor {key} contains NaN or Inf values"
        assert "layers.25.proj" not in " ".join(merged) and len(merged) < 40
