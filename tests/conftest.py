"""Real peft adapters on tiny transformers models built from configs; nothing is downloaded."""

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the Hub (set before huggingface_hub is imported)

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Embedding as LoraEmbedding
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, ResNetConfig, ResNetModel

from coremerge import load_adapters, merge_module
from coremerge.merging.merge import module_generator, module_names

BASE_NAME = "coremerge-tests/tiny-llama"


@pytest.fixture(autouse=True)
def key_map_cache(tmp_path_factory, monkeypatch):
    """Every test its own empty key map cache (coremerge.formats.key_map_cache), never the user's."""
    monkeypatch.setenv("COREMERGE_CACHE", str(tmp_path_factory.mktemp("key-maps")))


def tiny_llama(hidden_size: int = 32, name: str = BASE_NAME, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    model.name_or_path = name
    return model


def save_adapter(folder: Path, config: LoraConfig, seed: int, model=None, adapter_name: str = "default") -> Path:
    """Train nothing: peft's own non-zero init (init_lora_weights=False), saved by peft."""
    model = model or tiny_llama()
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    peft_model.save_pretrained(str(folder))
    return folder if adapter_name == "default" else folder / adapter_name


def lora(**kwargs) -> LoraConfig:
    return LoraConfig(init_lora_weights=False, lora_dropout=0.0, **kwargs)


def add_moslora_mixers(folder: Path, seed: int) -> dict[str, torch.Tensor]:
    """Rewrite a saved adapter as MoSLoRA: an r x r `lora_AB.weight` mixer beside lora_A / lora_B."""
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(folder / "adapter_model.safetensors")
    mixers = {}
    for key in list(tensors):
        if key.endswith("lora_A.weight"):
            r = tensors[key].shape[0]
            mixers[key.replace("lora_A", "lora_AB")] = torch.randn(r, r, generator=generator)
    save_file({**tensors, **mixers}, folder / "adapter_model.safetensors")
    return mixers


RESNET_TARGETS = ["embedder.embedder.convolution", "encoder.stages.1.layers.0.shortcut.convolution"]  # 7x7, 1x1


def tiny_resnet() -> ResNetModel:
    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    model = ResNetModel(config).eval()
    model.name_or_path = "coremerge-tests/tiny-resnet"
    return model


@pytest.fixture(scope="session")
def conv_adapter(tmp_path_factory) -> Path:
    """Conv2d LoRAs (7x7 and 1x1 kernels) on a tiny ResNet."""
    return save_adapter(tmp_path_factory.mktemp("conv") / "conv",
                        lora(r=3, lora_alpha=6, target_modules=RESNET_TARGETS), seed=8, model=tiny_resnet())


@pytest.fixture(scope="session")
def base_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """Adapters of one tiny Llama with heterogeneous ranks, alphas, rsLoRA, patterns, embedding, MoSLoRA."""
    root = tmp_path_factory.mktemp("adapters")
    attention = ["q_proj", "v_proj"]
    made = {
        "plain": save_adapter(root / "plain", lora(r=4, lora_alpha=8, target_modules=attention), seed=1),
        "rslora": save_adapter(
            root / "rslora", lora(r=8, lora_alpha=4, use_rslora=True, target_modules=attention), seed=2),
        "pattern": save_adapter(
            root / "pattern",
            lora(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
                 rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3}),
            seed=3),
        "named": save_adapter(
            root / "named", lora(r=3, lora_alpha=6, target_modules=attention), seed=4, adapter_name="other"),
        "embedding": save_adapter(
            root / "embedding", lora(r=2, lora_alpha=2, target_modules=["embed_tokens", "q_proj"]), seed=5),
        "moslora": save_adapter(root / "moslora", lora(r=4, lora_alpha=4, target_modules=attention), seed=6),
    }
    add_moslora_mixers(made["moslora"], seed=7)
    return made


def peft_deltas(base_model, folder: Path) -> dict[str, torch.Tensor]:
    """Each module's update as peft itself computes it, flattened to (m, n) like coremerge's dW = B~ @ A~."""
    model = PeftModel.from_pretrained(base_model, str(folder), adapter_name="probe")
    deltas = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "probe" in getattr(module, "scaling", {}):
            delta = module.get_delta_weight("probe").detach().to(torch.float64)
            if isinstance(module, LoraEmbedding):
                delta = delta.T  # peft stores embedding updates transposed: (num_embeddings, dim)
            deltas[name] = delta.reshape(delta.shape[0], -1)
    model.unload()
    return deltas


def expected_updates(sources, options):
    """The merged update per module straight from the library's spaces (no export involved)."""
    loaded = load_adapters([str(s) for s in sources])
    weights = options.weights_for(len(loaded))
    updates = {}
    for name in module_names(loaded):
        tasks = []
        for weight, adapter in zip(weights, loaded):
            if name in adapter.modules:
                with adapter.open() as reader:
                    tasks.append(adapter.read_factors(reader, name, weight))
        updates[name] = merge_module(tasks, options, module_generator(int(options.params.get("seed", 0)), name))
    return updates


def read_config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


@pytest.fixture(scope="session")
def app_server():
    """The real app (app.py) served on a free local port for the session; yields its URL."""
    import importlib.util
    import socket
    import threading

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("coremerge_app", root / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app.demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.demo.close()
    for thread in threading.enumerate():  # a warm-up still loading at exit aborts the interpreter (torch threads)
        if thread.name == "coremerge-warm-up":
            thread.join()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped without it; scripts/gpu_check.py runs them)")
