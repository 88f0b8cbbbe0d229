"""The key map cache: a file layout seen before loads the same, without importing diffusers; anything odd in the
cache is ignored, never trusted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_diffusion import write_kohya
from tiny_dit import write_kohya_flux

REPO = Path(__file__).resolve().parent.parent
LOAD = """
import json, sys
from coremerge.formats.loading import load_adapter
adapter = load_adapter(sys.argv[1])
print(json.dumps({"diffusers": "diffusers" in sys.modules, "family": adapter.family,
                  "modules": {name: repr(spec) for name, spec in sorted(adapter.modules.items())}}))
"""


def sdxl_kohya(path: Path, extra: bool = False) -> Path:
    """A kohya SDXL file (sgm block names, both text encoders) of a few attention layers."""
    generator = torch.Generator().manual_seed(0)

    def factors(prefix: str, n_in: int, n_out: int, rank: int = 4) -> dict[str, torch.Tensor]:
        return {f"{prefix}.lora_A.weight": torch.randn(rank, n_in, generator=generator),
                f"{prefix}.lora_B.weight": torch.randn(n_out, rank, generator=generator)}

    unet = {**factors("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 640, 640),
            **factors("up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k", 2048, 1280)}
    if extra:
        unet.update(factors("mid_block.attentions.0.transformer_blocks.0.attn1.to_v", 1280, 1280))
    state = {"unet": unet, "text_encoder": factors("encoder.layers.0.self_attn.q_proj", 768, 768),
             "text_encoder_2": factors("encoder.layers.3.mlp.fc1", 1280, 5120)}
    return write_kohya(path, state, alpha=2.0, sgm=True)


def flux_kohya(path: Path) -> Path:
    """A kohya Flux file with a fused qkv and linear1 (split onto separate modules when read)."""
    generator = torch.Generator().manual_seed(1)
    fused = {"lora_unet_single_blocks_2_linear1": (torch.randn(4, 3072, generator=generator),
                                                   torch.randn(21504, 4, generator=generator), 2.0),
             "lora_unet_double_blocks_0_img_attn_qkv": (torch.randn(4, 3072, generator=generator),
                                                        torch.randn(9216, 4, generator=generator), 4.0)}
    return write_kohya_flux(path, fused, dtype=torch.bfloat16)


def load_in_new_process(source: Path, cache: str) -> dict:
    env = {**os.environ, "COREMERGE_CACHE": cache, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", LOAD, str(source)], capture_output=True, text=True, env=env,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("write, family", [(sdxl_kohya, "SDXL"), (flux_kohya, "Flux.1")])
def test_a_layout_seen_before_loads_the_same_without_diffusers(write, family, tmp_path):
    source = write(tmp_path / "lora.safetensors")
    cache = tmp_path / "cache"
    first = load_in_new_process(source, str(cache))
    second = load_in_new_process(source, str(cache))
    assert first["diffusers"] and not second["diffusers"]
    assert first["modules"] == second["modules"] and first["family"] == second["family"] == family
    assert len(first["modules"]) >= 4
    assert [path.suffix for path in cache.iterdir()] == [".json"]  # one entry, no temporary file left


def test_a_different_layout_is_not_read_from_anothers_entry(tmp_path):
    cache = tmp_path / "cache"
    small = load_in_new_process(sdxl_kohya(tmp_path / "small.safetensors"), str(cache))
    larger = load_in_new_process(sdxl_kohya(tmp_path / "larger.safetensors", extra=True), str(cache))
    assert larger["diffusers"] and len(larger["modules"]) == len(small["modules"]) + 1
    assert len(list(cache.iterdir())) == 2


@pytest.mark.parametrize("damage", [
    "not json {",
    json.dumps(["a", "list"]),
    json.dumps({"transformer.single_transformer_blocks.2.attn.to_q.lora_A.weight": ["no.such.key", [[0, 4]], True]}),
    json.dumps({"transformer.single_transformer_blocks.2.attn.to_q.lora_A.weight":  # a scalar, not a factor
                ["lora_unet_single_blocks_2_linear1.alpha", [[0, 1]], True]}),
    "out of range",
])
def test_a_damaged_or_foreign_entry_is_ignored_and_rewritten(damage, tmp_path):
    source = flux_kohya(tmp_path / "lora.safetensors")
    cache = tmp_path / "cache"
    expected = load_in_new_process(source, str(cache))
    (entry,) = cache.iterdir()
    if damage == "out of range":  # a valid-looking entry whose rows lie outside the file's tensor
        stored = json.loads(entry.read_text())
        name = next(name for name, (key, ranges, full) in stored.items() if not full)
        stored[name][1] = [[0, 10**6]]
        damage = json.dumps(stored)
    entry.write_text(damage)
    again = load_in_new_process(source, str(cache))
    assert again["diffusers"] and again["modules"] == expected["modules"]
    assert load_in_new_process(source, str(cache)) == {**expected, "diffusers": False}  # rewritten, valid


def test_the_cache_can_be_turned_off_or_be_unwritable(tmp_path):
    source = sdxl_kohya(tmp_path / "lora.safetensors")
    runs = [load_in_new_process(source, "off") for _ in range(2)]
    assert all(run["diffusers"] for run in runs) and runs[0] == runs[1]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    unwritable = [load_in_new_process(source, str(blocker / "cache")) for _ in range(2)]
    assert unwritable == runs and blocker.read_text() == ""
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file", "lora.safetensors"]


def test_an_entry_is_tied_to_the_code_that_mapped_it(tmp_path, monkeypatch):
    from coremerge.formats import key_map_cache

    monkeypatch.setenv("COREMERGE_CACHE", str(tmp_path))
    calls = []

    def convert():
        calls.append(1)
        return {"module.lora_A.weight": "file.lora_down.weight"}

    def remembered():
        return key_map_cache.remembered("test", {"file.lora_down.weight": [4, 8]}, convert, str, str)

    assert remembered() == remembered() == {"module.lora_A.weight": "file.lora_down.weight"}
    assert len(calls) == 1  # the second call read the entry
    monkeypatch.setattr(key_map_cache, "_mapping_code", lambda: "other code")
    assert remembered() == {"module.lora_A.weight": "file.lora_down.weight"} and len(calls) == 2
    assert len(list(tmp_path.iterdir())) == 2
