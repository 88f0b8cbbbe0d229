"""Hub presets end to end on faithful stand-ins, offline: the app's handler merges, compares and packages.

Each stand-in is a tiny model of the real base model's class, with its module names and file layout, and
adapters saved by peft with the real repos' configuration, all put into a Hub cache laid out as
huggingface_hub lays it out (tests/hub_cache.py); HF_HUB_OFFLINE=1 (conftest), HF_HUB_CACHE points there.

tinyllama-tasks, what the stand-in relies on:
- huggingface/peft docs/source/developer_guides/model_merging.md and
  examples/multi_adapter_examples/Lora_Merging.ipynb: the tokenizer comes from smangrul/tinyllama_lora_norobots,
  and the base model's embeddings are resized to it (32005 = 32000 + 5 added tokens) before the adapters load.
- huggingface/peft examples/sft/utils.py `ChatmlSpecialTokens` (the script those adapters were trained with):
  the added tokens are "<|im_start|>user", "<|im_start|>assistant", "<|im_start|>system" (additional special
  tokens), "<|im_end|>" (eos) and "<pad>" (pad): 5 new ones, "<s>" already exists. examples/sft/run_peft.sh:
  LoRA r 8, alpha 16, dropout 0.1 on q/k/v/o/gate/up/down_proj.
- peft's get_peft_model_state_dict (save_embedding_layers="auto"): a model whose vocabulary was resized saves
  its full embed_tokens and lm_head beside the LoRA tensors (why the guide must resize before loading).
  The real repos' files were not read here (no Hub access): that they hold these tensors is inferred from the
  guide having to resize.
"""

import json
import re
import zipfile

import gradio as gr
import pytest
import torch
from huggingface_hub import constants
from hub_cache import add_repo, folder_files
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from coremerge.comparison import runners
from coremerge.presets import find_preset
from coremerge.webapp import handlers
from coremerge.webapp.cache import ResultCache

TINYLLAMA = find_preset("tinyllama-tasks")
CHATML = {"additional_special_tokens": ["<|im_start|>user", "<|im_start|>assistant", "<|im_start|>system"],
          "eos_token": "<|im_end|>", "pad_token": "<pad>"}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(handlers, "CACHE", ResultCache(capacity=4, root=tmp_path / "results"))
    runners.runner_for.cache_clear()
    yield cache
    runners.runner_for.cache_clear()


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-like tokenizer, small: <unk> <s> </s> and the 256 byte tokens, no merges."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    backend = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tinyllama_standin(root, cache):
    """Base repo (LlamaForCausalLM + tokenizer), three adapter repos saved by peft from a resized base; the first
    also holds the ChatML tokenizer. Returns the base folder and the adapter tokenizer."""
    base_tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(base_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2)
    base = LlamaForCausalLM(config).eval()
    base_folder = root / "base"
    base.save_pretrained(base_folder)
    base_tokenizer.save_pretrained(base_folder)
    add_repo(cache, TINYLLAMA.base_model, folder_files(base_folder))

    adapter_tokenizer = byte_level_tokenizer()
    adapter_tokenizer.add_special_tokens(CHATML)
    assert len(adapter_tokenizer) == len(base_tokenizer) + 5
    for seed, adapter in enumerate(TINYLLAMA.adapters, 1):
        torch.manual_seed(100 + seed)  # each training run initialised its new rows itself
        model = LlamaForCausalLM.from_pretrained(base_folder)
        model.resize_token_embeddings(len(adapter_tokenizer))
        model.name_or_path = TINYLLAMA.base_model
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, task_type="CAUSAL_LM",
                                                      target_modules=LLAMA_TARGETS, init_lora_weights=False))
        folder = root / adapter.task
        # What "auto" decides online (the vocabulary differs from the base repo's config): embed_tokens and lm_head
        # go along. Offline peft cannot read that config, so it is said here.
        peft_model.save_pretrained(folder, save_embedding_layers=True)
        if adapter.source == TINYLLAMA.tokenizer:
            adapter_tokenizer.save_pretrained(folder)
        add_repo(cache, adapter.source, folder_files(folder), absent=("config.json",))  # AutoTokenizer looks
    return base_folder, adapter_tokenizer


def expected_answers(base_folder, adapter_tokenizer, adapter_source, prompts, max_new_tokens):
    """The guide's way, independently: base, resized to the adapter tokenizer, with the adapter alone."""
    model = LlamaForCausalLM.from_pretrained(base_folder)
    model.resize_token_embeddings(len(adapter_tokenizer))
    model = PeftModel.from_pretrained(model, adapter_source).eval()
    batch = adapter_tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=adapter_tokenizer.pad_token_id)
    return adapter_tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def cells_of(table: str) -> tuple[list[str], list[list[str]]]:
    header = re.findall(r"<th>(.*?)</th>", table)
    rows = [re.findall(r'<td class="cm-text">(.*?)</td>', row, re.S) for row in table.split("<tr>")[2:]]
    return header, rows


def test_tinyllama_tasks_merge_side_by_side_and_download(hub_cache, tmp_path):
    import html

    base_folder, adapter_tokenizer = tinyllama_standin(tmp_path, hub_cache)
    saved = load_file(hub_cache / "models--smangrul--tinyllama_lora_sql" / "snapshots" /
                      "0123456789abcdef0123456789abcdef01234567" / "adapter_model.safetensors")
    assert saved["base_model.model.model.embed_tokens.weight"].shape[0] == len(adapter_tokenizer)
    assert "base_model.model.lm_head.weight" in saved  # what the real adapters save beyond LoRA tensors
    assert len(adapter_tokenizer("<|im_start|>user")["input_ids"]) == 1  # ChatML tokens are single tokens

    rows, _, _, prompts_text, _ = handlers.preset_view(TINYLLAMA.name)
    values = [p.default for p in handlers.PARAMETERS]
    outputs = handlers.merge_and_compare(TINYLLAMA.name, rows, "tsv", "core", 1.0, False, None, prompts_text, None, None,
                                         lambda fraction, desc=None: None, *values)
    summary, table, *_, zip_path, snippet, key = outputs

    header, cells = cells_of(table)
    names = [a.name for a in TINYLLAMA.adapters]
    assert header == ["prompt", "Base", *names, "Merged"]
    assert len(cells) == len(TINYLLAMA.samples.prompts)
    runner = runners.runner_for(TINYLLAMA.name, TINYLLAMA.folder)
    assert len(runner.tokenizer) == len(adapter_tokenizer)  # the adapter repo's tokenizer
    assert runner.model.get_input_embeddings().num_embeddings == len(adapter_tokenizer)  # resized
    for adapter in TINYLLAMA.adapters:
        expected = expected_answers(base_folder, adapter_tokenizer, adapter.source, TINYLLAMA.samples.prompts,
                                    runner.max_new_tokens)
        shown = [html.unescape(row[header.index(adapter.name)]) for row in cells]
        assert shown == expected and any(shown), adapter.name

    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(tmp_path / "download")
    folder = next((tmp_path / "download").rglob("adapter_config.json")).parent
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == TINYLLAMA.base_model
    model = LlamaForCausalLM.from_pretrained(base_folder)
    model.resize_token_embeddings(len(adapter_tokenizer))
    PeftModel.from_pretrained(model, str(folder))  # the download loads onto the guide's resized base


# sd15-styles and sdxl-styles, what the stand-ins rely on:
# - the base repos are diffusers pipelines saved by save_pretrained (model_index.json, one folder per component,
#   diffusion_pytorch_model.safetensors / model.safetensors), as stable-diffusion-v1-5/stable-diffusion-v1-5 and
#   stabilityai/stable-diffusion-xl-base-1.0 are laid out; the tiny pipelines of tests/tiny_diffusion.py have the
#   same classes and module names (StableDiffusionPipeline / StableDiffusionXLPipeline, UNet2DConditionModel,
#   CLIPTextModel and CLIPTextModelWithProjection), without the SD 1.5 safety checker.
# - the LoRAs are single kohya / A1111 files at the presets' paths (huggingface/diffusers
#   tests/lora/test_lora_layers_sd.py loads the SD 1.5 ones with load_lora_weights(repo, weight_name=...);
#   docs/source/en/tutorials/using_peft_for_inference.md the SDXL ones): lora_unet_* (Stability's sgm block
#   names for SDXL), lora_te_* (SD 1.x) or lora_te1_* / lora_te2_* (SDXL), .lora_down / .lora_up / .alpha,
#   written by diffusers' own peft -> kohya converter (tests/tiny_diffusion.py write_kohya).

SD_UNET_TARGETS = r".*attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"


def diffusion_standin(preset, root, cache):
    from tiny_diffusion import add_lora, tiny_sd15, tiny_sdxl, tiny_tokenizer, write_kohya

    sdxl = preset.name == "sdxl-styles"
    tokenizer = tiny_tokenizer(root / "tokenizer")
    build = tiny_sdxl if sdxl else tiny_sd15
    build(tokenizer).save_pretrained(root / "base")
    add_repo(cache, preset.base_model, folder_files(root / "base"))
    text_encoders = ("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",)
    for seed, adapter in enumerate(preset.adapters, 1):
        configs = {"unet": LoraConfig(r=4, lora_alpha=4, target_modules=SD_UNET_TARGETS, init_lora_weights=False),
                   **{name: LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"],
                                       init_lora_weights=False) for name in text_encoders}}
        path = write_kohya(root / f"lora{seed}.safetensors", add_lora(build(tokenizer), configs, seed), alpha=4,
                           sgm=sdxl)
        org, name, inner = adapter.source.split("/", 2)
        add_repo(cache, f"{org}/{name}", {inner: path})
    return root / "base"


@pytest.mark.parametrize("name", ["sd15-styles", "sdxl-styles"])
def test_diffusion_presets_merge_side_by_side_and_download(name, hub_cache, tmp_path, monkeypatch, request):
    from dataclasses import replace

    from diffusers import DiffusionPipeline

    from coremerge.webapp import workflow

    preset = find_preset(name)
    base = diffusion_standin(preset, tmp_path, hub_cache)
    # The app's limits on image size and steps (a Space operator's knob) keep the tiny pipelines fast here.
    monkeypatch.setattr(workflow, "LIMITS", replace(workflow.LIMITS, image_side=32, steps=2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only fights on a shared machine
    request.addfinalizer(lambda: torch.set_num_threads(threads))

    rows, _, _, prompts_text, uses_prompts = handlers.preset_view(name)
    assert uses_prompts
    values = [p.default for p in handlers.PARAMETERS]
    outputs = handlers.merge_and_compare(name, rows, "ta", "core", 1.0, False, None, prompts_text, None, None,
                                         lambda fraction, desc=None: None, *values)
    summary, grid_html, *_, zip_path, snippet, key = outputs
    runner = runners.runner_for(name, preset.folder)
    assert type(runner.pipe).__name__ == ("StableDiffusionXLPipeline" if "xl" in name else "StableDiffusionPipeline")
    assert grid_html.count("<img ") == len(preset.samples.prompts) * (len(preset.adapters) + 2)
    assert all(f"{a.name}" in grid_html for a in preset.adapters)

    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(tmp_path / "download")
    weights = next((tmp_path / "download").rglob("pytorch_lora_weights.safetensors"))
    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(str(weights.parent), weight_name=weights.name, adapter_name="merged")
    assert "merged" in pipe.get_list_adapters()["unet"]


# knots-vit-b32, what the stand-in relies on: gstoica27/KnOTS utils.py prepare_hf_clip loads each
# hoffman-lab/KnOTS-ViT-B-32_lora_R16_<task> repo with PeftModel.from_pretrained onto CLIPModel.vision_model;
# apanariello4/core-space-merging configs/vitB_r16_*.py: rank 16, alpha 16, q/k/v/out_proj, base
# openai/clip-vit-base-patch32. So: a peft folder per repo, keys base_model.model.encoder.layers.<i>.self_attn.*.
# The base repo holds the CLIP model, its tokenizer and preprocessor_config.json (CLIPProcessor loads both).
# The datasets are parquet files as the `datasets` library pushes them to the Hub (push_to_hub): data/ (or the
# configuration's folder: mnist/, cropped_digits/) / test-00000-of-00001.parquet, an image column of
# {"bytes", "path"} structs, an integer label, and the features (Image, ClassLabel with the class names) in the
# schema's "huggingface" metadata (datasets arrow_writer / features.py: Features.to_arrow_schema).

DATASET_CLASSES = {"eurosat": 10, "gtsrb": 43, "mnist": 10, "svhn": 10}  # tasks whose heads use the paper's names
ROWS = 4  # per tiny dataset; the runner takes two of them (rows 1 and 3)


def tiny_dataset(task: str, path, seed: int) -> list[tuple[bytes, int]]:
    """A test split of ROWS random 40 x 40 images, written as the `datasets` library writes parquet."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    generator = np.random.default_rng(seed)
    names = [f"{task}_class_{i}" for i in range(DATASET_CLASSES.get(task, 3))]
    rows = []
    for _ in range(ROWS):
        buffer = io.BytesIO()
        Image.fromarray(generator.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buffer, format="PNG")
        rows.append((buffer.getvalue(), int(generator.integers(len(names)))))
    features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
    table = pa.table({"image": [{"bytes": b, "path": None} for b, _ in rows], "label": [label for _, label in rows]},
                     schema=pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                                       ("label", pa.int64())],
                                      metadata={"huggingface": json.dumps({"info": {"features": features}})}))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=3)  # two row groups: rows 1 and 3 sit in different ones
    return rows


def knots_standin(preset, root, cache):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    tokenizer = byte_level_tokenizer()
    config = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                     "num_attention_heads": 4, "vocab_size": len(tokenizer)},
                        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                       "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
                        projection_dim=16)
    CLIPModel(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "base")
    add_repo(cache, preset.base_model, folder_files(root / "base"))
    folders = []
    for seed, adapter in enumerate(preset.adapters, 1):
        vision = CLIPModel.from_pretrained(root / "base").vision_model
        vision.name_or_path = preset.base_model
        torch.manual_seed(seed)
        lora_config = LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                                 init_lora_weights=False)
        get_peft_model(vision, lora_config).save_pretrained(root / adapter.task)
        add_repo(cache, adapter.source, folder_files(root / adapter.task))
        folders.append(root / adapter.task)
    data = {}
    for seed, dataset in enumerate(preset.samples.datasets, 100):
        folder = dataset.subset or ("mnist" if dataset.task == "mnist" else "data")
        files = {f"{folder}/test-00000-of-00001.parquet": root / "datasets" / dataset.task / "test.parquet"}
        data[dataset.task] = tiny_dataset(dataset.task, files[f"{folder}/test-00000-of-00001.parquet"], seed)
        if dataset.subset:  # another configuration of the same repo, which must not be read
            decoy = root / "datasets" / dataset.task / "other.parquet"
            tiny_dataset(dataset.task, decoy, seed + 50)
            files[f"full_numbers/test-00000-of-00001.parquet"] = decoy
        add_repo(cache, dataset.source, files, kind="datasets")
    return root / "base", folders, data


def expected_classes(base, adapter, task, rows, names):
    """The zero-shot class of rows 1 and 3, independently: CLIPModel, peft on its vision_model, the task's head."""
    import io

    from PIL import Image
    from transformers import AutoProcessor, CLIPModel

    from coremerge.comparison.clip_zero_shot import TEMPLATES

    model = CLIPModel.from_pretrained(base).eval()
    processor = AutoProcessor.from_pretrained(base)
    processor.tokenizer.pad_token = processor.tokenizer.eos_token
    if adapter is not None:
        PeftModel.from_pretrained(model.vision_model, str(adapter))  # LoRA layers go into model.vision_model
    with torch.no_grad():
        head = []
        for name in names:
            prompts = processor.tokenizer([t.format(name) for t in TEMPLATES[task]], return_tensors="pt",
                                          padding=True, truncation=True, max_length=77)
            text = torch.nn.functional.normalize(model.get_text_features(**prompts).pooler_output, dim=-1)
            head.append(torch.nn.functional.normalize(text.mean(0), dim=0))
        images = [Image.open(io.BytesIO(rows[i][0])).convert("RGB") for i in (1, 3)]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        features = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        return [names[i] for i in (features @ torch.stack(head).T).argmax(-1).tolist()]


def classification_cells(table: str) -> tuple[list[str], list[str], list[list[str]]]:
    """The header, the true label of each row, and each row's predicted labels (base, adapters, merged)."""
    header = re.findall(r"<th>(.*?)</th>", table)
    rows = table.split("<tr>")[2:-1]
    truth = [re.search(r"<td><b>(.*?)</b></td>", row).group(1) for row in rows]
    return header, truth, [re.findall(r'<td class="cm-(?:right|wrong)[^"]*">(.*?)</td>', row) for row in rows]


def test_knots_vit_b32_merge_zero_shot_side_by_side_and_download(hub_cache, tmp_path):
    import html

    from conftest import peft_deltas
    from transformers import CLIPModel

    from coremerge.comparison.clip_zero_shot import PAPER_CLASS_NAMES

    preset = find_preset("knots-vit-b32")
    base, folders, data = knots_standin(preset, hub_cache.parent, hub_cache)
    rows, *_ = handlers.preset_view(preset.name)
    values = [p.default for p in handlers.PARAMETERS]
    outputs = handlers.merge_and_compare(preset.name, rows, "ta", "core", 1.0, False, None, "", None, None,
                                         lambda fraction, desc=None: None, *values)
    table, zip_path = outputs[1], outputs[7]
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(tmp_path / "download")
    merged = next((tmp_path / "download").rglob("adapter_config.json")).parent

    header, truth, predicted = classification_cells(table)
    names = [a.name for a in preset.adapters]
    assert header[:3 + len(names) + 2] == ["image", "task", "label", "Base", *names, "Merged"]
    tasks = [d.task for d in preset.samples.datasets]
    assert len(predicted) == 2 * len(tasks) and all(len(row) == len(names) + 2 for row in predicted)
    for t, task in enumerate(tasks):
        classes = list(PAPER_CLASS_NAMES.get(task, [f"{task}_class_{i}".replace("_", " ") for i in range(3)]))
        assert truth[2 * t:2 * t + 2] == [html.escape(classes[data[task][i][1]]) for i in (1, 3)]
        for column, adapter in [(0, None), (1 + t, folders[t]), (len(names) + 1, merged)]:
            shown = [html.unescape(row[column]) for row in predicted[2 * t:2 * t + 2]]
            assert shown == expected_classes(base, adapter, task, data[task], classes), (task, column)
    assert any(row[0] != row[c] for row in predicted for c in range(1, len(row)))  # the LoRAs change classes
    # The heads were built on first use and written to the runner's folder: a new ZeroGPU worker (a fork without
    # this process's memory of them) reads them from there and classifies the same way.
    runner = runners.runner_for(preset.name, preset.folder)
    assert sorted(p.name for p in runner.folder.glob("head-*.pt")) == sorted(f"head-{t}.pt" for t in tasks)
    runner.heads.clear()
    assert runner.predict("eurosat") == [html.unescape(row[0]) for row in predicted[4:6]]
    # the footer: each column's right answers on these samples
    right = [sum(html.unescape(row[c]) == html.unescape(t) for row, t in zip(predicted, truth))
             for c in range(len(names) + 2)]
    assert header[-(len(names) + 2):] == [f"{n}/{len(predicted)}" for n in right]

    vision = lambda: CLIPModel.from_pretrained(base).vision_model  # noqa: E731
    got = peft_deltas(vision(), merged)
    expected = {}
    for folder in folders:
        for name, delta in peft_deltas(vision(), folder).items():
            expected[name] = expected.get(name, 0) + delta
    assert set(got) == set(expected) and len(got) == 2 * 4
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)


def test_knots_vit_b32_side_by_side_says_which_dataset_is_missing_offline(hub_cache, tmp_path):
    import shutil

    preset = find_preset("knots-vit-b32")
    knots_standin(preset, hub_cache.parent, hub_cache)
    shutil.rmtree(hub_cache / "datasets--tanganke--gtsrb")
    rows, *_ = handlers.preset_view(preset.name)
    values = [p.default for p in handlers.PARAMETERS]
    with pytest.raises(gr.Error) as raised:
        handlers.merge_and_compare(preset.name, rows, "ta", "core", 1.0, False, None, "", None, None,
                                   lambda fraction, desc=None: None, *values)
    assert raised.value.message.startswith(
        "dataset tanganke/gtsrb: its test split is not in the local Hub cache and the Hub is offline "
        "(HF_HUB_OFFLINE=1). Preset knots-vit-b32 needs the Hugging Face Hub; the bundled presets (")
    assert "\n" not in raised.value.message and str(hub_cache.parent) not in raised.value.message


def test_the_paper_prompt_templates_per_task():
    """gstoica27/KnOTS dataset/templates.py: how many templates each task has, and the ones that are not plain."""
    from coremerge.comparison.clip_zero_shot import TEMPLATES

    assert {task: len(t) for task, t in TEMPLATES.items()} == {
        "stanford_cars": 8, "dtd": 8, "eurosat": 3, "gtsrb": 3, "mnist": 1, "resisc45": 18, "sun397": 2, "svhn": 1}
    assert TEMPLATES["resisc45"][:3] == ("satellite imagery of {}.", "aerial imagery of {}.", "satellite photo of {}.")
    assert TEMPLATES["resisc45"][-1] == "aerial view of the {}."
    assert TEMPLATES["mnist"] == TEMPLATES["svhn"] == ('a photo of the number: "{}".',)
    assert TEMPLATES["gtsrb"][0].format("stop") == 'a zoomed in photo of a "stop" traffic sign.'
