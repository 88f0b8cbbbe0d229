"""SD3 / SD3.5 LoRAs through the same path as Flux: diffusers files of a tiny SD3.5 pipeline load to the updates
peft computes, merge with every method into one file that `StableDiffusion3Pipeline.load_lora_weights` loads
with exactly the merged update; SD3 is told apart from Flux.1 and SDXL, and mixing them is refused."""

import pytest
import torch
from conftest import expected_updates
from diffusers.loaders.lora_pipeline import SD3LoraLoaderMixin
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from test_diffusion import expect_error, one_torch_thread, tokenizer  # noqa: F401 (fixtures)
from tiny_diffusion import add_lora
from tiny_dit import dit_deltas, tiny_sd35

from coremerge import METHODS, MergeOptions, load_adapter, merge_to_folder
from coremerge.cli import main
from coremerge.formats.diffusion_family import FLUX, SD3, UNKNOWN_DIT



def save_sd3_lora(pipe, folder, transformer_config, text_configs: dict, seed: int):
    """peft LoRA layers on the pipeline, saved by diffusers' SD3 loader with their LoraConfigs in the header."""
    state = add_lora(pipe, text_configs, seed=seed)
    torch.manual_seed(seed + 100)
    pipe.transformer.add_adapter(transformer_config)
    layers = {f"{name}_lora_layers": tensors for name, tensors in state.items()}
    metadata = {f"{name}_lora_adapter_metadata": config.to_dict() for name, config in text_configs.items()}
    SD3LoraLoaderMixin.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                         transformer_lora_adapter_metadata=transformer_config.to_dict(),
                                         **layers, **metadata)
    return folder / "pytorch_lora_weights.safetensors", dit_deltas(pipe)


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tokenizer) -> dict:
    root = tmp_path_factory.mktemp("sd3_loras")
    files, deltas = {}, {}
    # SD3.5's second attention (attn2) and the second CLIP: told SD3 by its modules
    a = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=[
        "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn2.to_k", "transformer_blocks.1.attn.add_v_proj",
        "transformer_blocks.1.ff.net.2", "transformer_blocks.0.norm1.linear"])
    te2 = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["q_proj", "fc2"])
    files["a"], deltas["a"] = save_sd3_lora(tiny_sd35(tokenizer), root / "a", a, {"text_encoder_2": te2}, seed=1)
    # joint-block modules only (as Flux's double blocks name them): a transformer LoRA of unknown family
    b = LoraConfig(r=3, lora_alpha=3, init_lora_weights=False, target_modules=[
        "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.1.ff.net.2",
        "transformer_blocks.1.attn.to_add_out"])
    te1 = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["k_proj"])
    files["b"], deltas["b"] = save_sd3_lora(tiny_sd35(tokenizer), root / "b", b, {"text_encoder": te1}, seed=2)
    return {"files": files, "deltas": deltas}


@pytest.mark.parametrize("kind, family", [("a", SD3), ("b", UNKNOWN_DIT)])
def test_sd3_loras_load_to_the_updates_peft_computes(kind, family, loras):
    adapter = load_adapter(str(loras["files"][kind]))
    assert (adapter.format, adapter.family) == ("diffusers", family)
    with adapter.open() as reader:
        ours = {name: (lambda t: t.b @ t.a)(adapter.read_factors(reader, name)) for name in adapter.modules}
    theirs = loras["deltas"][kind]
    assert sorted(ours) == sorted(theirs)
    for name, delta in theirs.items():
        torch.testing.assert_close(ours[name], delta, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def sd3_pipe(tokenizer):
    return tiny_sd35(tokenizer)


@pytest.mark.parametrize("method", METHODS)
def test_sd3_loras_merge_into_a_file_the_sd3_pipeline_loads(method, loras, sd3_pipe, tmp_path):
    sources = [loras["files"]["a"], loras["files"]["b"]]
    options = MergeOptions.create(method=method, weights=[1, 0.6])
    report = merge_to_folder([str(s) for s in sources], options, tmp_path / "out")
    assert (report["family"], report["output_format"]) == (SD3, "diffusers")
    expected = expected_updates(sources, options)
    expected = {name: u for name, u in expected.items() if name not in report["zero_modules"]}
    sd3_pipe.load_lora_weights(str(tmp_path / "out"), adapter_name=method)
    try:
        loaded = dit_deltas(sd3_pipe, method)
    finally:
        sd3_pipe.delete_adapters([method])
    assert sorted(loaded) == sorted(expected)
    assert {name.split(".")[0] for name in loaded} == {"transformer", "text_encoder", "text_encoder_2"}
    for name, update in expected.items():
        torch.testing.assert_close(loaded[name], update.dense(), rtol=1e-4, atol=1e-6)


def wide_lora(path, width: int):
    """One joint-block query projection at a real width: 1536 (SD3 medium / SD3.5 medium) or 3072 (Flux.1)."""
    name = "transformer.transformer_blocks.0.attn.to_q"
    save_file({f"{name}.lora_A.weight": torch.randn(2, width), f"{name}.lora_B.weight": torch.randn(width, 2)},
              str(path))
    return path


def test_sd3_is_told_apart_from_flux_and_sdxl_and_never_merged_with_them(capsys, tmp_path, loras):
    from test_diffusion import real_width_kohya

    sd3 = wide_lora(tmp_path / "sd3.safetensors", 1536)
    flux = wide_lora(tmp_path / "flux.safetensors", 3072)
    sdxl = real_width_kohya(tmp_path / "sdxl.safetensors", sdxl=True)
    assert (load_adapter(str(sd3)).family, load_adapter(str(flux)).family) == (SD3, FLUX)
    line = expect_error(capsys, tmp_path, [sd3, flux], "only LoRAs of the same base model can be merged")
    assert f"{flux} is a LoRA for Flux.1 but {sd3} is for SD3" in line
    line = expect_error(capsys, tmp_path, [loras["files"]["b"], sdxl], "only LoRAs of the same base model")
    assert f"{sdxl} is a LoRA for SDXL but {loras['files']['b']} is for a diffusion transformer" in line
    # the family-less SD3 LoRA merges with an SD3 one (the module shapes decide), and the report names SD3
    report = merge_to_folder([str(loras["files"]["b"]), str(loras["files"]["a"])], MergeOptions.create(method="ta"),
                             tmp_path / "ok")
    assert report["family"] == SD3


@pytest.mark.parametrize("key", ["lora_unet_joint_blocks_0_x_block_attn_qkv",
                                 "diffusion_model.joint_blocks.0.x_block.attn.qkv"])
def test_sd3_loras_in_kohya_or_comfyui_naming_are_refused(key, capsys, tmp_path, loras):
    """diffusers converts no SD3 layout but its own; such files once loaded as a UNet named `unet.joint.blocks`."""
    path = tmp_path / "sd3_kohya.safetensors"
    save_file({f"{key}.lora_down.weight": torch.ones(2, 1536), f"{key}.lora_up.weight": torch.ones(4608, 2),
               f"{key}.alpha": torch.tensor(2.0)}, str(path))
    expect_error(capsys, tmp_path, [loras["files"]["a"], path],
                 f"{path}: SD3 LoRA in kohya / ComfyUI naming (tensor {key}.")
