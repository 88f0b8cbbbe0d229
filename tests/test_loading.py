"""Loading: coremerge's canonical B~ @ A~ equals the update peft itself computes, for every format."""

import pytest
import torch
from conftest import BASE_NAME, RESNET_TARGETS, peft_deltas, tiny_resnet
from safetensors.torch import load_file

from coremerge import load_adapter
from coremerge.merging.merge import module_names


def canonical_updates(source) -> dict[str, torch.Tensor]:
    adapter = load_adapter(str(source))
    with adapter.open() as reader:
        return {name: (lambda t: t.b @ t.a)(adapter.read_factors(reader, name)) for name in adapter.modules}


@pytest.mark.parametrize("kind", ["plain", "rslora", "pattern", "named", "embedding"])
def test_canonical_update_equals_peft_delta(kind, adapters, base_model):
    ours = canonical_updates(adapters[kind])
    theirs = peft_deltas(base_model, adapters[kind])
    assert sorted(ours) == sorted(theirs)
    for name, delta in theirs.items():
        torch.testing.assert_close(ours[name], delta, rtol=1e-5, atol=1e-6)


def test_metadata(adapters):
    adapter = load_adapter(str(adapters["pattern"]))
    assert adapter.base_model == BASE_NAME
    assert adapter.format == "peft"
    assert adapter.ranks["model.layers.1.self_attn.q_proj"] == 2  # rank_pattern
    assert adapter.ranks["model.layers.0.self_attn.q_proj"] == 4
    assert adapter.modules["model.layers.0.self_attn.v_proj"].scaling == 3 / 4  # alpha_pattern
    assert adapter.modules["model.layers.0.mlp.up_proj"].scaling == 16 / 4
    rslora = load_adapter(str(adapters["rslora"]))
    assert rslora.modules["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(4 / 8 ** 0.5)
    assert load_adapter(str(adapters["embedding"])).modules["model.embed_tokens"].kind == "embedding"


def test_moslora_mixer_is_folded_into_b(adapters):
    """dW = s * B @ W @ A with W = lora_AB.weight, computed here from the raw tensors."""
    tensors = load_file(adapters["moslora"] / "adapter_model.safetensors")
    adapter = load_adapter(str(adapters["moslora"]))
    assert adapter.format == "peft-moslora"
    ours = canonical_updates(adapters["moslora"])
    for name in adapter.modules:
        prefix = f"base_model.model.{name}"
        a, b, w = (tensors[f"{prefix}.{part}.weight"].double() for part in ("lora_A", "lora_B", "lora_AB"))
        torch.testing.assert_close(ours[name], 1.0 * b @ w @ a)  # lora_alpha / r = 1


def test_conv_lora_is_flattened(conv_adapter):
    """Conv2d LoRAs (7x7 and 1x1 kernels): flattened B~ @ A~ equals peft's kernel delta."""
    ours = canonical_updates(conv_adapter)
    theirs = peft_deltas(tiny_resnet(), conv_adapter)
    assert sorted(ours) == sorted(theirs) == sorted(RESNET_TARGETS)
    assert load_adapter(str(conv_adapter)).modules[RESNET_TARGETS[0]].a_shape == (3, 3, 7, 7)
    for name in RESNET_TARGETS:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)


def test_single_safetensors_file_uses_sibling_config(adapters):
    adapter = load_adapter(str(adapters["plain"] / "adapter_model.safetensors"))
    assert adapter.ranks == load_adapter(str(adapters["plain"])).ranks


def test_safe_pickled_bin_loads(adapters, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((adapters["plain"] / "adapter_config.json").read_bytes())
    torch.save(load_file(adapters["plain"] / "adapter_model.safetensors"), folder / "adapter_model.bin")
    ours, reference = canonical_updates(folder), canonical_updates(adapters["plain"])
    assert ours.keys() == reference.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name])


def test_module_union_across_adapters(adapters):
    """Different target-module sets are normal: the merge covers their union."""
    loaded = [load_adapter(str(adapters[k])) for k in ("plain", "pattern", "embedding")]
    names = module_names(loaded)
    assert "model.layers.0.mlp.up_proj" in names and "model.embed_tokens" in names
    assert len(names) == len(set().union(*(a.modules for a in loaded)))


def test_a_files_tensor_index_is_read_once_per_load_and_again_for_the_next(adapters, monkeypatch, tmp_path):
    """The format checks share one reading of the file's index; a later load reads the file again, so a file
    rewritten in between (same size, the first load's objects still alive) is seen as it is now."""
    from safetensors.torch import save_file

    from coremerge.formats import peft_format
    from coremerge.formats.sources import resolve_source

    reads = []
    read = peft_format._read_tensor_index
    monkeypatch.setattr(peft_format, "_read_tensor_index", lambda resolved: reads.append(resolved) or read(resolved))
    load_adapter(str(adapters["plain"]))
    assert len(reads) == 1  # three format checks asked for it
    load_adapter(str(adapters["plain"]))
    assert len(reads) == 2

    folder = tmp_path / "rewritten"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, '
                                                '"target_modules": ["proj"]}')
    key = "base_model.model.proj.lora_{}.weight"
    weights = folder / "adapter_model.safetensors"
    save_file({key.format("A"): torch.ones(4, 64), key.format("B"): torch.ones(64, 4)}, weights)
    first = resolve_source(str(folder))
    assert peft_format.tensor_index(first)[0][key.format("A")] == (4, 64)
    size = weights.stat().st_size
    save_file({key.format("A"): torch.ones(4, 32), key.format("B"): torch.ones(96, 4)}, weights)
    assert weights.stat().st_size == size
    assert load_adapter(str(folder)).modules["proj"].shape == (96, 32)  # not the index `first` read, still alive
    assert peft_format.tensor_index(first)[0][key.format("A")] == (4, 64)  # that object keeps what it read
