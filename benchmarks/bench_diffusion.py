"""Benchmark: merging SDXL-sized LoRAs (kohya and diffusers files) with the `coremerge merge` CLI.

Synthetic adapters with the real SDXL module shapes (UNet and both CLIP text encoders built on the
meta device from their published configs, so no weights are needed), targeting what kohya's sd-scripts
targets by default: every Linear of the UNet's transformer blocks (attention, feed-forward, proj_in /
proj_out) and the text encoders' attention and MLP layers. Two kohya files (float16, ranks 32 and 16,
alpha 16 and 8) and one diffusers file (float16, rank 8, its LoraConfig in the header) are written, then
merged with TSV in core space, `--repeats` times (best counts; the first run maps the files' keys with diffusers,
the later ones read the maps from a fresh key map cache), each beside the floor for the same bytes
(`measure.py`: start Python, import torch, read the inputs, write a file of the output's size). Printed: the
CLI's own summary, wall and CPU time with the load average, the breakdown, the floor and the ratio, peak RSS.
Targets: <= 5 s wall and <= 2.5x the floor.

Usage:
    python benchmarks/bench_diffusion.py [--workdir DIR] [--method tsv] [--repeats 3] [--keep]
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from measure import fresh_key_map_cache, load, print_cold_and_warm, print_floor_comparison, run_floor, run_measured

REPO = Path(__file__).resolve().parent.parent
TARGET_SECONDS, TARGET_RATIO = 5.0, 2.5

SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280)
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def sdxl_linear_shapes() -> dict[str, tuple[int, int]]:
    """`component.module` -> (out_features, in_features) of every module a kohya SDXL LoRA adapts."""
    with torch.device("meta"):
        models = {
            "unet": (UNet2DConditionModel(**SDXL_UNET), UNET_TARGETS),
            "text_encoder": (CLIPTextModel(CLIPTextConfig(**CLIP_L)), TEXT_TARGETS),
            "text_encoder_2": (CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)), TEXT_TARGETS),
        }
    shapes = {}
    for component, (model, targets) in models.items():
        for name, module in model.named_modules():
            in_transformer = (component != "unet" or "transformer_blocks" in name
                              or name.endswith(("proj_in", "proj_out")))
            if isinstance(module, torch.nn.Linear) and name.endswith(targets) and in_transformer:
                shapes[f"{component}.{name}"] = (module.out_features, module.in_features)
    return shapes


def random_factors(shapes, rank: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (m, n) in shapes.items():
        tensors[f"{name}.lora_A.weight"] = (torch.randn(rank, n, generator=generator) / n ** 0.5).half()
        tensors[f"{name}.lora_B.weight"] = (torch.randn(m, rank, generator=generator) * 0.01).half()
    return tensors


def write_kohya(path: Path, shapes, rank: int, alpha: float, seed: int) -> None:
    """kohya keys by diffusers' peft -> kohya converter (diffusers block names; kohya's own SDXL files use sgm
    names, which coremerge maps too), CLIP modules under `text_model.` as kohya writes them."""
    factors = random_factors(shapes, rank, seed)
    factors = {k if k.startswith("unet.") or ".text_model." in k or ".text_projection" in k
               else k.replace(".", ".text_model.", 1): v for k, v in factors.items()}
    kohya = convert_state_dict_to_kohya(factors)
    kohya = {k: torch.tensor(alpha, dtype=torch.float16) if k.endswith(".alpha") else v for k, v in kohya.items()}
    save_file(kohya, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"})


def write_diffusers(path: Path, shapes, rank: int, seed: int) -> None:
    """peft-style keys, named as diffusers saves them (transformers 5: CLIPTextModel without `text_model.`)."""
    tensors = random_factors(shapes, rank, seed)
    config = {"r": rank, "lora_alpha": rank, "target_modules": sorted(set(UNET_TARGETS + TEXT_TARGETS))}
    packed = {f"{c}.{k}": v for c in ("unet", "text_encoder", "text_encoder_2") for k, v in config.items()}
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(packed)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--method", default="tsv")
    parser.add_argument("--repeats", type=int, default=3, help="CLI and floor runs; the best counts (default 3)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="coremerge-bench-diffusion-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        shapes = sdxl_linear_shapes()
        files = [workdir / "kohya_a.safetensors", workdir / "kohya_b.safetensors", workdir / "diffusers_c.safetensors"]
        write_kohya(files[0], shapes, rank=32, alpha=16, seed=1)
        write_kohya(files[1], shapes, rank=16, alpha=8, seed=2)
        write_diffusers(files[2], shapes, rank=8, seed=3)
        out = workdir / "merged"
        command = [sys.executable, "-m", "coremerge", "merge", *map(str, files), "--method", args.method,
                   "--output", str(out)]
        runs, floors = [], []
        fresh_key_map_cache(workdir)
        for _ in range(args.repeats):
            shutil.rmtree(out, ignore_errors=True)
            runs.append(run_measured(command, REPO))
            if min(runs, key=lambda run: run["seconds"]) is runs[-1]:
                breakdown = json.loads((out / "merge_report.json").read_text())["seconds"]
            written = next(out.glob("*.safetensors"))
            floors.append(run_floor(files, written.stat().st_size, workdir / "floor.safetensors", REPO))
        sizes = " + ".join(f"{f.stat().st_size / 1e6:.0f}" for f in files)
        print(f"sdxl: {len(shapes)} modules per adapter, inputs {sizes} MB, output {written.stat().st_size / 1e6:.0f} MB"
              f" ({load()})")
        print(f"cli: {min(runs, key=lambda run: run['seconds'])['output'].splitlines()[-1]}")
        print_floor_comparison("cli", runs, floors, breakdown, TARGET_SECONDS, TARGET_RATIO)
        print_cold_and_warm(runs)
    finally:
        if not args.keep:
            shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
