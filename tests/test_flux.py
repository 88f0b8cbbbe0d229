"""Flux.1 LoRAs: kohya files (fused qkv / linear1, CLIP-L parts), XLabs files and diffusers files of a tiny
Flux pipeline load to the updates peft computes (and to the fused product, split exactly); they merge with
every method in every space into one diffusers file that `FluxPipeline.load_lora_weights` loads with exactly
the merged update; what is not a plain LoRA of Flux.1 is refused with one line."""

import json

import numpy as np
import pytest
import torch
from conftest import expected_updates
from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from test_diffusion import (assert_fused_weights_move_by_the_weighted_sum, expect_error,  # noqa: F401 (fixtures)
                            one_torch_thread, tokenizer)
from tiny_diffusion import add_lora
from tiny_dit import (KOHYA_DOUBLE, KOHYA_SINGLE, dit_deltas, fused_shapes, split_updates, tiny_flux,
                      write_kohya_flux)

from coremerge import METHODS, MergeOptions, load_adapter, merge_to_folder
from coremerge.cli import main
from coremerge.comparison.images import GenerationSettings, LoraEntry, compare_images
from coremerge.formats.diffusion_family import FLUX
from coremerge.merging.spaces import SPACE_MERGES

ALPHA = 3.0  # at rank 4: s = 0.75, not a power of two (diffusers' own conversion rounds it into fp16 factors)
DIFFUSERS_TARGETS = [  # overlaps the kohya LoRA in some modules, has its own elsewhere
    "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.add_k_proj",
    "transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.attn.to_k",
    "single_transformer_blocks.0.proj_out", "proj_out",
]



def kohya_text_encoder(pipe, seed: int, alpha: float) -> tuple[dict, dict]:
    """CLIP-L LoRA factors under kohya's `lora_te1_` names (diffusers' peft -> kohya converter), and their updates."""
    config = LoraConfig(r=2, lora_alpha=alpha, target_modules=["q_proj", "fc1"], init_lora_weights=False)
    state = add_lora(pipe, {"text_encoder": config}, seed=seed)["text_encoder"]
    prefixed = {f"text_encoder.{k if k.startswith('text_model.') else 'text_model.' + k}": v for k, v in state.items()}
    kohya = {k: (torch.tensor(alpha) if k.endswith(".alpha") else v)
             for k, v in convert_state_dict_to_kohya(prefixed).items()}
    return kohya, dit_deltas(pipe)


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tokenizer) -> dict:
    """A kohya and a diffusers LoRA of the tiny Flux pipeline, and each one's per-module update."""
    root = tmp_path_factory.mktemp("flux_loras")
    files, deltas = {}, {}

    # kohya: fused factors on every module kohya names in the double block, the single block's linear2 and
    # modulation, img_in / txt_in, the final layer (diffusers swaps its shift / scale halves), CLIP-L parts
    pipe = tiny_flux(tokenizer)
    transformer, generator = pipe.transformer, torch.Generator().manual_seed(1)
    single = {k: v for k, v in KOHYA_SINGLE.items() if k != "linear1"}  # linear1: real widths only, below
    fused, expected = {}, {}
    for block, table, prefix in (("transformer_blocks", KOHYA_DOUBLE, "lora_unet_double_blocks_0_"),
                                 ("single_transformer_blocks", single, "lora_unet_single_blocks_0_")):
        for kohya, (m, n, parts) in fused_shapes(transformer, block, 0, table).items():
            down, up = torch.randn(4, n, generator=generator), torch.randn(m, 4, generator=generator)
            fused[prefix + kohya] = (down, up, ALPHA)
            widths = [transformer.get_submodule(f"{block}.0.{part}").out_features for part in parts]
            expected.update(split_updates(kohya, down, up, ALPHA, parts, widths, f"transformer.{block}.0"))
    for kohya, module in (("img_in", "x_embedder"), ("txt_in", "context_embedder"),
                          ("final_layer_adaLN_modulation_1", "norm_out.linear")):
        layer = transformer.get_submodule(module)
        down = torch.randn(4, layer.in_features, generator=generator)
        up = torch.randn(layer.out_features, 4, generator=generator)
        fused[f"lora_unet_{kohya}"] = (down, up, ALPHA)
        update = split_updates(kohya, down, up, ALPHA, (module,), [layer.out_features], "transformer")
        if kohya.startswith("final_layer"):  # BFL's (shift, scale) is diffusers' (scale, shift)
            half = layer.out_features // 2
            update = {k: torch.cat([u[half:], u[:half]]) for k, u in update.items()}
        expected.update(update)
    write_kohya_flux(root / "style_a.safetensors", fused)
    te_tensors, te_deltas = kohya_text_encoder(pipe, seed=2, alpha=4.0)
    save_file({**load_file(root / "style_a.safetensors"), **te_tensors}, str(root / "style_a.safetensors"),
              metadata={"ss_base_model_version": "flux1"})
    files["kohya"], deltas["kohya"] = root / "style_a.safetensors", {**expected, **te_deltas}

    # diffusers, saved by FluxPipeline.save_lora_weights with its LoraConfig metadata (r 3, alpha 6, a pattern)
    pipe = tiny_flux(tokenizer)
    config = LoraConfig(r=3, lora_alpha=6, target_modules=DIFFUSERS_TARGETS, init_lora_weights=False,
                        rank_pattern={"proj_out": 2})
    te_config = LoraConfig(r=2, lora_alpha=2, target_modules=["k_proj", "out_proj"], init_lora_weights=False)
    state = add_lora(pipe, {"text_encoder": te_config}, seed=3)
    torch.manual_seed(4)
    pipe.transformer.add_adapter(config)
    FluxLoraLoaderMixin.save_lora_weights(
        root / "style_b", transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
        text_encoder_lora_layers=state["text_encoder"], transformer_lora_adapter_metadata=config.to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict())
    files["diffusers"] = root / "style_b" / "pytorch_lora_weights.safetensors"
    deltas["diffusers"] = dit_deltas(pipe)
    return {"files": files, "deltas": deltas}


def canonical_updates(source) -> dict[str, torch.Tensor]:
    adapter = load_adapter(str(source))
    with adapter.open() as reader:
        return {name: (lambda t: t.b @ t.a)(adapter.read_factors(reader, name)) for name in adapter.modules}


@pytest.mark.parametrize("kind, fmt", [("kohya", "kohya"), ("diffusers", "diffusers")])
def test_loading_equals_the_fused_product_and_peft(kind, fmt, loras):
    ours = canonical_updates(loras["files"][kind])
    theirs = loras["deltas"][kind]
    assert sorted(ours) == sorted(theirs)
    for name, delta in theirs.items():
        torch.testing.assert_close(ours[name], delta, rtol=1e-5, atol=1e-7)
    adapter = load_adapter(str(loras["files"][kind]))
    assert (adapter.format, adapter.family) == (fmt, FLUX)
    assert {name.split(".")[0] for name in adapter.modules} == {"transformer", "text_encoder"}


def test_kohya_qkv_splits_onto_q_k_v_reading_rows_of_one_up_factor(loras):
    adapter = load_adapter(str(loras["files"]["kohya"]))
    q, k, v = (adapter.modules[f"transformer.transformer_blocks.0.attn.to_{p}"] for p in "qkv")
    assert q.a_key == k.a_key == v.a_key == "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"
    assert (q.b_rows, k.b_rows, v.b_rows) == (((0, 32),), ((32, 64),), ((64, 96),))
    assert q.a_columns is None and q.rank == 4 and q.scaling == ALPHA / 4
    final = adapter.modules["transformer.norm_out.linear"]
    assert final.b_rows == ((32, 64), (0, 32))  # diffusers' swap_scale_shift, as a row permutation


def test_diffusers_reads_the_kohya_file_as_we_do(loras, tokenizer):
    """Numerically, with diffusers' own loader: `load_lora_weights` of the kohya file (its converter folds
    alpha / r into fp32 factors) gives the updates coremerge reads, on every module it loads. Two gaps of
    diffusers 0.42 are pinned here, both filled by coremerge (its merged file loads them): kohya's top-level
    modules (img_in, txt_in, final_layer) convert without the `transformer.` prefix and are dropped, and
    CLIP's q_proj converts to the old `to_q_lora` name that transformers 5 does not load."""
    pipe = tiny_flux(tokenizer)
    path = loras["files"]["kohya"]
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="kohya")
    loaded = dit_deltas(pipe, "kohya")
    ours = canonical_updates(path)
    assert set(ours) - set(loaded) == {
        "transformer.x_embedder", "transformer.context_embedder", "transformer.norm_out.linear",
        "text_encoder.encoder.layers.0.self_attn.q_proj", "text_encoder.encoder.layers.1.self_attn.q_proj"}
    assert set(loaded) <= set(ours)
    for name, update in loaded.items():
        torch.testing.assert_close(update, ours[name], rtol=1e-5, atol=1e-6)


def real_width_kohya(path, dtype=torch.bfloat16, alpha=ALPHA):
    """A single block's linear1 (3072 -> q, k, v 3072 each + MLP 12288) and a double block's txt qkv at Flux.1's
    real widths (diffusers' converter hard-codes them), rank 4, stored in bfloat16."""
    generator = torch.Generator().manual_seed(5)
    fused = {
        "lora_unet_single_blocks_7_linear1": (torch.randn(4, 3072, generator=generator),
                                              torch.randn(21504, 4, generator=generator), alpha),
        "lora_unet_double_blocks_3_txt_attn_qkv": (torch.randn(4, 3072, generator=generator),
                                                   torch.randn(9216, 4, generator=generator), alpha),
    }
    write_kohya_flux(path, fused, dtype=dtype)
    return {name: (down.to(dtype), up.to(dtype), a) for name, (down, up, a) in fused.items()}


def test_fused_linear1_and_qkv_split_exactly_at_flux_widths(tmp_path):
    fused = real_width_kohya(tmp_path / "wide.safetensors")
    expected = {
        **split_updates("linear1", *fused["lora_unet_single_blocks_7_linear1"],
                        KOHYA_SINGLE["linear1"], [3072, 3072, 3072, 12288], "transformer.single_transformer_blocks.7"),
        **split_updates("qkv", *fused["lora_unet_double_blocks_3_txt_attn_qkv"],
                        KOHYA_DOUBLE["txt_attn_qkv"], [3072] * 3, "transformer.transformer_blocks.3"),
    }
    adapter = load_adapter(str(tmp_path / "wide.safetensors"))
    assert adapter.family == FLUX and adapter.dtype == torch.bfloat16
    ours = canonical_updates(tmp_path / "wide.safetensors")
    assert sorted(ours) == sorted(expected)
    for name, update in expected.items():  # float64 from the stored bf16 factors: exact up to float64 rounding
        torch.testing.assert_close(ours[name], update, rtol=1e-12, atol=1e-12)
    assert adapter.modules["transformer.single_transformer_blocks.7.proj_mlp"].b_rows == ((9216, 21504),)
    # diffusers' own conversion multiplies the bf16 factors by 0.75 in bf16: close, not exact
    converted = FluxLoraLoaderMixin.lora_state_dict(str(tmp_path / "wide.safetensors"))
    name = "transformer.single_transformer_blocks.7.proj_mlp"
    theirs = converted[f"{name}.lora_B.weight"].double() @ converted[f"{name}.lora_A.weight"].double()
    error = torch.linalg.norm(theirs - expected[name]) / torch.linalg.norm(expected[name])
    assert 0 < error < 1e-2


def loaded_deltas(pipe, folder, adapter_name):
    pipe.load_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors", adapter_name=adapter_name)
    try:
        return dit_deltas(pipe, adapter_name)
    finally:
        pipe.delete_adapters([adapter_name])


@pytest.fixture(scope="module")
def flux_pipe(tokenizer):
    return tiny_flux(tokenizer)


@pytest.mark.parametrize("method, space", [(m, s) for s in SPACE_MERGES for m in METHODS])
def test_kohya_and_diffusers_flux_merge_into_a_file_flux_loads(method, space, loras, flux_pipe, tmp_path, capsys):
    """Every method in every space: a kohya and a diffusers Flux LoRA merge into one diffusers file;
    `FluxPipeline.load_lora_weights` puts exactly the merged update on every module."""
    sources = [loras["files"]["kohya"], loras["files"]["diffusers"]]
    out = tmp_path / "out"
    assert main(["merge", *map(str, sources), "--method", method, "--space", space, "--weights", "1", "0.7",
                 "--output", str(out)]) == 0
    assert "merged 2 adapter(s)" in capsys.readouterr().out
    report = json.loads((out / "merge_report.json").read_text())
    assert (report["output_format"], report["family"]) == ("diffusers", FLUX)
    assert [s["format"] for s in report["sources"]] == ["kohya", "diffusers"]
    expected = expected_updates(sources, MergeOptions.create(method=method, space=space, weights=[1, 0.7]))
    expected = {name: u for name, u in expected.items() if name not in report["zero_modules"]}
    loaded = loaded_deltas(flux_pipe, out, f"{method}_{space}")
    assert sorted(loaded) == sorted(expected)
    for name, update in expected.items():
        torch.testing.assert_close(loaded[name], update.dense(), rtol=1e-4, atol=1e-6)


def test_fused_weights_change_by_the_weighted_sum_of_the_original_updates(loras, tokenizer, tmp_path):
    """Task arithmetic against the originals alone (the fused products and peft's updates, no coremerge math):
    after `fuse_lora` every adapted weight of the tiny Flux has moved by exactly 1.0 dW_kohya - 0.5 dW_diffusers."""
    assert_fused_weights_move_by_the_weighted_sum(loras, {"kohya": 1.0, "diffusers": -0.5}, tiny_flux(tokenizer),
                                                  ["transformer", "text_encoder"], tmp_path)


def write_xlabs(path) -> dict[str, torch.Tensor]:
    """XLabs' layout for the tiny Flux: the image stream's fused qkv and the text stream's attention output."""
    generator = torch.Generator().manual_seed(6)
    tensors = {"double_blocks.0.processor.qkv_lora1.down.weight": torch.randn(4, 32, generator=generator),
               "double_blocks.0.processor.qkv_lora1.up.weight": torch.randn(96, 4, generator=generator),
               "double_blocks.0.processor.proj_lora2.down.weight": torch.randn(4, 32, generator=generator),
               "double_blocks.0.processor.proj_lora2.up.weight": torch.randn(32, 4, generator=generator)}
    save_file(tensors, str(path))
    return tensors


def test_xlabs_layout_loads_as_diffusers_reads_it(loras, tokenizer, tmp_path):
    """XLabs' attention processors (`double_blocks.0.processor.qkv_lora1.down.weight`; no alpha: s = 1)."""
    tensors = write_xlabs(tmp_path / "xlabs.safetensors")
    adapter = load_adapter(str(tmp_path / "xlabs.safetensors"))
    assert (adapter.format, adapter.family) == ("xlabs", FLUX)
    fused = tensors["double_blocks.0.processor.qkv_lora1.up.weight"].double() @ \
        tensors["double_blocks.0.processor.qkv_lora1.down.weight"].double()
    ours = canonical_updates(tmp_path / "xlabs.safetensors")
    torch.testing.assert_close(ours["transformer.transformer_blocks.0.attn.to_k"], fused[32:64])
    pipe = tiny_flux(tokenizer)
    pipe.load_lora_weights(str(tmp_path), weight_name="xlabs.safetensors", adapter_name="xlabs")
    loaded = dit_deltas(pipe, "xlabs")
    assert sorted(loaded) == sorted(ours)
    for name, update in ours.items():
        torch.testing.assert_close(loaded[name], update, rtol=1e-5, atol=1e-6)


def write_with_alphas(path, transformer) -> None:
    """diffusers keys with `<lora_A key>.alpha` tensors on some modules (diffusers' test of this layout)."""
    generator, tensors = torch.Generator().manual_seed(7), {}
    for name in ("transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_q",
                 "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.proj_out"):
        layer = transformer.get_submodule(name)
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(4, layer.in_features, generator=generator)
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, 4, generator=generator)
    for name, alpha in (("transformer_blocks.0.attn.to_k", 16.0), ("single_transformer_blocks.0.attn.to_k", 8.0),
                        ("single_transformer_blocks.0.proj_out", 8.0)):
        tensors[f"transformer.{name}.lora_A.weight.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))


def test_alphas_in_a_diffusers_file_scale_as_diffusers_loads_them(tokenizer, tmp_path):
    """A `transformer.*` file with `.alpha` keys on some modules (as TheLastBen's Flux LoRAs have them):
    modules with an alpha get alpha / r, the others the component's most common alpha / r, as diffusers'
    LoraConfig gives them; checked against `load_lora_weights` of the file."""
    pipe = tiny_flux(tokenizer)
    write_with_alphas(tmp_path / "alphas.safetensors", pipe.transformer)
    scalings = {n: s.scaling for n, s in load_adapter(str(tmp_path / "alphas.safetensors")).modules.items()}
    assert scalings["transformer.transformer_blocks.0.attn.to_k"] == 4.0
    assert scalings["transformer.transformer_blocks.0.attn.to_q"] == 2.0  # no alpha: the most common, 8
    pipe.load_lora_weights(str(tmp_path), weight_name="alphas.safetensors", adapter_name="alphas")
    loaded, ours = dit_deltas(pipe, "alphas"), canonical_updates(tmp_path / "alphas.safetensors")
    assert sorted(loaded) == sorted(ours)
    for name, update in ours.items():
        torch.testing.assert_close(loaded[name], update, rtol=1e-5, atol=1e-5)


def test_a_peft_folder_of_a_flux_transformer_loads_with_component_names(tokenizer, tmp_path):
    from peft import get_peft_model

    pipe = tiny_flux(tokenizer)
    torch.manual_seed(8)
    config = LoraConfig(r=2, lora_alpha=6, init_lora_weights=False,
                        target_modules=["single_transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2"])
    get_peft_model(pipe.transformer, config).save_pretrained(str(tmp_path / "peft_flux"))
    adapter = load_adapter(str(tmp_path / "peft_flux"))
    assert (adapter.format, adapter.family) == ("peft", FLUX)
    ours, theirs = canonical_updates(tmp_path / "peft_flux"), dit_deltas(pipe)
    assert sorted(ours) == sorted(theirs) == ["transformer.single_transformer_blocks.0.attn.to_q",
                                              "transformer.transformer_blocks.0.ff.net.2"]
    for name, delta in theirs.items():
        torch.testing.assert_close(ours[name], delta, rtol=1e-5, atol=1e-7)


COMFYUI = {  # ComfyUI's names of a few kohya modules (diffusion_model. / text_encoders.clip_l.transformer.)
    "lora_unet_double_blocks_0_img_attn_qkv": "diffusion_model.double_blocks.0.img_attn.qkv",
    "lora_unet_single_blocks_0_linear2": "diffusion_model.single_blocks.0.linear2",
    "lora_te1_text_model_encoder_layers_0_mlp_fc1":
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1",
}


def test_comfyui_layout_loads_as_the_same_kohya_modules(loras, tmp_path):
    kohya = load_file(loras["files"]["kohya"])
    comfy = {COMFYUI[key.split(".")[0]] + key[len(key.split(".")[0]):]: value for key, value in kohya.items()
             if key.split(".")[0] in COMFYUI}
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    adapter = load_adapter(str(tmp_path / "comfy.safetensors"))
    assert (adapter.format, adapter.family) == ("comfyui", FLUX)
    ours, reference = canonical_updates(tmp_path / "comfy.safetensors"), loras["deltas"]["kohya"]
    assert sorted(ours) == sorted([
        "text_encoder.encoder.layers.0.mlp.fc1", "transformer.single_transformer_blocks.0.proj_out",
        *(f"transformer.transformer_blocks.0.attn.to_{p}" for p in "qkv")])
    for name, update in ours.items():
        torch.testing.assert_close(update, reference[name], rtol=1e-5, atol=1e-7)


def test_kohya_diffusers_named_layout_loads_as_diffusers_reads_it(tokenizer, tmp_path):
    """`lora_transformer_*` keys (kohya-style down / up / alpha on diffusers' module names)."""
    pipe, generator, tensors = tiny_flux(tokenizer), torch.Generator().manual_seed(10), {}
    for name, alpha in (("transformer_blocks.0.attn.to_q", 2.0), ("transformer_blocks.0.attn.add_k_proj", 8.0),
                        ("single_transformer_blocks.0.attn.to_v", 3.0), ("context_embedder", 4.0)):
        layer, key = pipe.transformer.get_submodule(name), "lora_transformer_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, layer.in_features, generator=generator)
        tensors[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, 4, generator=generator)
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(tmp_path / "named.safetensors"))
    adapter = load_adapter(str(tmp_path / "named.safetensors"))
    assert (adapter.format, adapter.family) == ("kohya", FLUX)
    assert adapter.modules["transformer.context_embedder"].scaling == 1.0
    pipe.load_lora_weights(str(tmp_path), weight_name="named.safetensors", adapter_name="named")
    loaded, ours = dit_deltas(pipe, "named"), canonical_updates(tmp_path / "named.safetensors")
    assert sorted(loaded) == sorted(ours) and len(ours) == 4
    for name, update in ours.items():
        torch.testing.assert_close(loaded[name], update, rtol=1e-5, atol=1e-5)


FAL_DOUBLE = {"img_attn.proj": (3072, 3072), "img_attn.qkv": (9216, 3072), "img_mlp.0": (12288, 3072),
              "img_mlp.2": (3072, 12288), "img_mod.lin": (18432, 3072), "txt_attn.proj": (3072, 3072),
              "txt_attn.qkv": (9216, 3072), "txt_mlp.0": (12288, 3072), "txt_mlp.2": (3072, 12288),
              "txt_mod.lin": (18432, 3072)}
FAL_SINGLE = {"linear1": (21504, 3072), "linear2": (3072, 15360), "modulation.lin": (9216, 3072)}


def test_fal_kontext_layout_splits_exactly(tmp_path):
    """fal's Kontext trainer: BFL names under `base_model.model.`, every block of FLUX.1 (diffusers' converter
    needs them all), rank 1 here to stay small."""
    generator, tensors = torch.Generator().manual_seed(9), {}
    modules = {**{f"double_blocks.{i}.{k}": v for i in range(19) for k, v in FAL_DOUBLE.items()},
               **{f"single_blocks.{i}.{k}": v for i in range(38) for k, v in FAL_SINGLE.items()},
               "final_layer.linear": (64, 3072)}
    for name, (m, n) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(1, n, generator=generator)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(m, 1, generator=generator)
    save_file(tensors, str(tmp_path / "kontext.safetensors"))
    adapter = load_adapter(str(tmp_path / "kontext.safetensors"))
    assert (adapter.format, adapter.family, len(adapter.modules)) == ("fal-kontext", FLUX, 19 * 14 + 38 * 6 + 1)

    def fused(name):
        return tensors[f"base_model.model.{name}.lora_B.weight"].double() @ \
            tensors[f"base_model.model.{name}.lora_A.weight"].double()

    with adapter.open() as reader:  # three modules only: dense updates of every Flux layer take ~100 GB
        for name, reference in (
                ("transformer_blocks.3.attn.add_k_proj", fused("double_blocks.3.txt_attn.qkv")[3072:6144]),
                ("single_transformer_blocks.5.proj_mlp", fused("single_blocks.5.linear1")[9216:]),
                ("proj_out", fused("final_layer.linear"))):
            factors = adapter.read_factors(reader, f"transformer.{name}")
            torch.testing.assert_close(factors.b @ factors.a, reference)


QKV = "lora_unet_double_blocks_0_img_attn_qkv"


@pytest.mark.parametrize("kind, tensors, message", [
    ("LoHa", {f"{QKV}.hada_w1_a": (96, 2), f"{QKV}.hada_w1_b": (2, 32), f"{QKV}.alpha": ()},
     f"LoHa adapter (tensor {QKV}.hada_w1_a)"),
    ("LoKr", {f"{QKV}.lokr_w1": (2, 2), f"{QKV}.lokr_w2": (48, 16), f"{QKV}.alpha": ()},
     f"LoKr adapter (tensor {QKV}.lokr_w"),
    ("DoRA", {f"{QKV}.lora_down.weight": (2, 32), f"{QKV}.lora_up.weight": (96, 2), f"{QKV}.dora_scale": (1, 32)},
     f"DoRA (dora_scale) adapter (tensor {QKV}.dora_scale)"),
    ("diff", {f"{QKV}.lora_down.weight": (2, 32), f"{QKV}.lora_up.weight": (96, 2),
              "lora_unet_double_blocks_0_img_attn_norm_query_norm.diff": (16,)},
     "full-weight difference (tensor lora_unet_double_blocks_0_img_attn_norm_query_norm.diff); it is not a "
     "low-rank update, so coremerge refuses to merge the file"),
    ("control", {"transformer.x_embedder.lora_A.weight": (2, 128), "transformer.x_embedder.lora_B.weight": (32, 2),
                 "transformer.transformer_blocks.0.attn.norm_q.query_norm.scale": (16,)},
     "Flux control LoRA (tensor transformer.transformer_blocks.0.attn.norm_q.query_norm.scale)"),
    ("widened", {"lora_unet_img_in.lora_down.weight": (2, 128), "lora_unet_img_in.lora_up.weight": (3072, 2)},
     "its x_embedder LoRA reads 128 input channels but Flux.1 has 64: a control LoRA that widens the layer"),
    ("lost", {"lora_transformer_single_transformer_blocks_0_proj_out.lora_down.weight": (2, 80),
              "lora_transformer_single_transformer_blocks_0_proj_out.lora_up.weight": (32, 2),
              "lora_transformer_single_transformer_blocks_0_proj_out.alpha": ()},
     "diffusers maps lora_transformer_single_transformer_blocks_0_proj_out.lora_down.weight to "
     "transformer.single_transformer_blocks.0, a whole block rather than a layer; coremerge cannot merge this key"),
])
def test_what_is_not_a_plain_flux_lora_is_refused(kind, tensors, message, loras, capsys, tmp_path):
    path = tmp_path / f"{kind.lower()}.safetensors"
    save_file({key: torch.ones(shape) for key, shape in tensors.items()}, str(path))
    line = expect_error(capsys, tmp_path, [loras["files"]["kohya"], path], message)
    assert line.startswith(f"coremerge: error: {path}: ")


def test_flux_and_sdxl_loras_are_not_merged(capsys, tmp_path, loras):
    from test_diffusion import real_width_kohya as sd_kohya

    sdxl = sd_kohya(tmp_path / "sdxl.safetensors", sdxl=True)
    line = expect_error(capsys, tmp_path, [sdxl, loras["files"]["kohya"]], "only LoRAs of the same base model")
    assert f"{loras['files']['kohya']} is a LoRA for Flux.1 but {sdxl} is for SDXL" in line


# --- comparison ---

def test_image_grid_on_a_flux_pipeline(loras, tokenizer, tmp_path):
    """Base, each LoRA and the merged LoRA on one tiny Flux pipeline, schnell-like settings (no guidance)."""
    kohya, diffusers = str(loras["files"]["kohya"]), str(loras["files"]["diffusers"])
    merge_to_folder([kohya, diffusers], MergeOptions.create(method="tsv"), tmp_path / "merged")
    pipe = tiny_flux(tokenizer)
    settings = GenerationSettings(num_inference_steps=2, guidance_scale=0.0, width=16, height=16, seed=3)
    entries = [LoraEntry("Style A", kohya, "pixel art"), LoraEntry("Style B", diffusers, "watercolor")]
    grid = compare_images(pipe, entries, tmp_path / "merged", ["a photo of a cat"], settings)
    assert grid.variants == ("base", "Style A", "Style B", "merged")
    assert {image.size for row in grid.images for image in row} == {(16, 16)}
    pixels = [np.asarray(image) for image in grid.images[0]]
    assert all(not np.array_equal(pixels[0], pixels[v]) for v in (1, 2, 3))
    assert not any(pipe.get_list_adapters().values())


def test_the_flux_hub_preset_maps_onto_the_loader_and_the_comparison(loras, tokenizer, tmp_path, monkeypatch):
    """Stand-ins in each real file's layout at the preset's Hub paths (an offline cache laid out as
    huggingface_hub does): the diffusers file with alphas, the kohya file with CLIP-L parts, the XLabs file.
    They load as one Flux.1 set, merge into a diffusers file, and the preset's adapters and settings drive the
    comparison (at a tiny size) with each trigger in front of its prompts."""
    from huggingface_hub import constants
    from test_hub import add_to_cache

    from coremerge import load_adapters
    from coremerge.presets import find_preset

    preset = find_preset("flux-styles")
    write_with_alphas(tmp_path / "jon_snow.safetensors", tiny_flux(tokenizer).transformer)
    write_xlabs(tmp_path / "disney_lora.safetensors")
    stand_ins = [tmp_path / "jon_snow.safetensors", loras["files"]["kohya"], tmp_path / "disney_lora.safetensors"]
    for adapter, stand_in in zip(preset.adapters, stand_ins):
        owner, repo, inner = adapter.source.split("/", 2)
        add_to_cache(tmp_path / "hub", f"{owner}/{repo}", {inner: stand_in})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    adapters = load_adapters(preset.adapter_sources)
    assert [(a.format, a.family, a.origin) for a in adapters] == [
        ("diffusers", FLUX, "hub"), ("kohya", FLUX, "hub"), ("xlabs", FLUX, "hub")]
    report = merge_to_folder(preset.adapter_sources, MergeOptions.create(method="tsv"), tmp_path / "out")
    assert (report["family"], report["file"]) == (FLUX, "pytorch_lora_weights.safetensors")
    settings = GenerationSettings(**preset.samples.generation)
    assert (settings.num_inference_steps, settings.guidance_scale) == (4, 0.0)  # FLUX.1-schnell
    entries = [LoraEntry(a.name, a.source, a.trigger or "") for a in preset.adapters]
    small = GenerationSettings(num_inference_steps=2, guidance_scale=0.0, width=16, height=16, seed=settings.seed)
    grid = compare_images(tiny_flux(tokenizer), entries, tmp_path / "out", preset.samples.prompts[:1], small)
    assert grid.variants == ("base", "Jon Snow", "Optimus", "Disney style", "merged")
    assert grid.prompts_used[0][1:] == ("jon snow, eating pizza with ketchup", "optimus, eating pizza with ketchup",
                                        "disney style, eating pizza with ketchup",
                                        "jon snow, optimus, disney style, eating pizza with ketchup")
