"""Image generation in the app's workflow: a tiny SD 1.5-like pipeline preset, two kohya LoRAs, one merge;
the grid has base, each LoRA and the merge for every prompt, and the download loads with load_lora_weights."""

import zipfile

import pytest
import torch
import yaml
from peft import LoraConfig
from tiny_diffusion import add_lora, tiny_sd15, tiny_tokenizer, write_kohya

from coremerge import MergeOptions
from coremerge.presets import load_preset
from coremerge.webapp.render import comparison_html
from coremerge.webapp.workflow import AdapterRow, MergeRequest, run_merge

UNET_TARGETS = r"down_blocks\.0\.attentions\.0\.(proj_in|transformer_blocks\.0\.attn[12]\.to_q)|down_blocks\.0\.resnets\.0\.conv1"
PROMPTS = ("a photo of a cat", "a dog")


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only fights on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def image_preset(tmp_path):
    """A preset file beside a saved tiny pipeline and two kohya LoRA files (paths relative to the preset)."""
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer")
    tiny_sd15(tokenizer).save_pretrained(tmp_path / "base")
    for name, seed in (("pixel", 1), ("watercolor", 2)):
        state = add_lora(tiny_sd15(tokenizer), {
            "unet": LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, init_lora_weights=False),
            "text_encoder": LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], init_lora_weights=False),
        }, seed=seed)
        write_kohya(tmp_path / f"{name}.safetensors", state, alpha=8, sgm=False)
    preset = {
        "name": "tiny-styles", "title": "Tiny styles", "description": "Two style LoRAs on a tiny pipeline.",
        "kind": "image-generation", "base_model": "base", "bundled": True,
        "adapters": [{"name": "Pixel", "source": "pixel.safetensors", "trigger": "pixel art"},
                     {"name": "Watercolor", "source": "watercolor.safetensors", "trigger": "watercolor"}],
        "samples": {"prompts": list(PROMPTS),
                    "generation": {"num_inference_steps": 2, "guidance_scale": 3.0, "width": 32, "height": 32,
                                   "seed": 3}},
    }
    (tmp_path / "tiny-styles.yaml").write_text(yaml.safe_dump(preset))
    return load_preset(tmp_path / "tiny-styles.yaml")


def test_image_grid_and_a_diffusers_download(image_preset, tmp_path):
    rows = tuple(AdapterRow(a.source, a.name, w) for a, w in zip(image_preset.adapters, (1.0, 0.5)))
    request = MergeRequest(image_preset, rows, MergeOptions.create(method="ties", density=0.5), PROMPTS)
    outcome = run_merge(request, tmp_path / "work")

    grid = outcome.comparison
    assert grid.variants == ("base", "Pixel", "Watercolor", "Merged") and grid.prompts == PROMPTS
    assert [len(row) for row in grid.images] == [4, 4]
    assert {image.size for row in grid.images for image in row} == {(32, 32)}
    assert grid.prompts_used[1] == ("a dog", "pixel art, a dog", "watercolor, a dog", "pixel art, watercolor, a dog")
    assert comparison_html(grid).count('class="cm-generated"') == 8

    assert outcome.report["output_format"] == "diffusers"
    zipfile.ZipFile(outcome.zip_path).extractall(tmp_path / "download")
    folder = tmp_path / "download" / "merged-adapter"  # the folder the snippet loads
    assert {p.name for p in folder.iterdir()} == {"pytorch_lora_weights.safetensors", "merge_report.json", "README.md"}
    assert "library_name: diffusers" in (folder / "README.md").read_text()
    # the "use it in code" snippet loads the download into the pipeline (the prompt line is left out: no generation)
    code = "\n".join(line for line in outcome.snippet.splitlines() if not line.startswith("image = "))
    namespace = {}
    code = code.replace(f'"presets/{image_preset.base_model}"', repr(str(image_preset.folder / image_preset.base_model)))
    exec(code.replace('"merged-adapter"', repr(str(folder))), namespace)
    assert any(namespace["pipe"].get_list_adapters().values())
