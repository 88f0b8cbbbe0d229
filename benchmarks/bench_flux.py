"""Benchmark: merging three Flux.1-sized LoRAs (kohya and diffusers files mixed) with the `coremerge merge` CLI.

Synthetic adapters with FLUX.1-dev's real module shapes (its transformer built on the meta device from its
published config, so no weights are needed), on every transformer block, as kohya's sd-scripts trains them
by default: in the 19 double blocks the fused img / txt `qkv`, attention output, MLP and modulation layers;
in the 38 single blocks the fused `linear1` (q, k, v and MLP input), `linear2` and the modulation. Two kohya
files (bfloat16, ranks 16 and 64, alpha 8 and 32) and one diffusers file (bfloat16, rank 32, q / k / v
separate, its LoraConfig in the header) are written, then merged with TSV in core space, `--repeats` times
(the first run maps the files' keys with diffusers, the later ones read the maps from a fresh key map cache); the
lines printed are the CLI's own summary, each run's wall and CPU time with the load average and the peak resident
memory of the merge process (CPU time tells more than wall time on a shared machine), the best run against the
targets (<= 15 s, <= 3 GB).

Usage:
    python benchmarks/bench_flux.py [--workdir DIR] [--method tsv] [--space core] [--repeats 3] [--keep]
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from measure import fresh_key_map_cache, met, print_cold_and_warm, run_measured

REPO = Path(__file__).resolve().parent.parent
TARGET_SECONDS, TARGET_RSS_GB = 15.0, 3.0

FLUX_DEV = dict(  # black-forest-labs/FLUX.1-dev, transformer/config.json
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# kohya's module of a block -> the diffusers modules it feeds, in the row order of its (fused) output
KOHYA_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",), "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",), "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",), "txt_mod_lin": ("norm1_context.linear",),
}
KOHYA_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
                "modulation_lin": ("norm.linear",)}


def flux_shapes() -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    """(kohya module -> (out, in) of the fused layer, diffusers module -> (out, in)) over every block."""
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX_DEV)
    kohya, diffusers = {}, {}
    for blocks, table, prefix, count in (("transformer_blocks", KOHYA_DOUBLE, "lora_unet_double_blocks", 19),
                                         ("single_transformer_blocks", KOHYA_SINGLE, "lora_unet_single_blocks", 38)):
        for index in range(count):
            for name, parts in table.items():
                layers = [transformer.get_submodule(f"{blocks}.{index}.{part}") for part in parts]
                kohya[f"{prefix}_{index}_{name}"] = (sum(layer.out_features for layer in layers), layers[0].in_features)
                for part, layer in zip(parts, layers):
                    diffusers[f"transformer.{blocks}.{index}.{part}"] = (layer.out_features, layer.in_features)
    return kohya, diffusers


def factors(shapes, rank: int, seed: int, down: str, up: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (m, n) in shapes.items():
        tensors[f"{name}.{down}"] = (torch.randn(rank, n, generator=generator) / n ** 0.5).to(torch.bfloat16)
        tensors[f"{name}.{up}"] = (torch.randn(m, rank, generator=generator) * 0.01).to(torch.bfloat16)
    return tensors


def write_kohya(path: Path, shapes, rank: int, alpha: float, seed: int) -> None:
    tensors = factors(shapes, rank, seed, "lora_down.weight", "lora_up.weight")
    tensors.update({f"{name}.alpha": torch.tensor(alpha, dtype=torch.bfloat16) for name in shapes})
    metadata = {"ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux"}
    save_file(tensors, str(path), metadata=metadata)


def write_diffusers(path: Path, shapes, rank: int, seed: int) -> None:
    tensors = factors(shapes, rank, seed, "lora_A.weight", "lora_B.weight")
    config = {"r": rank, "lora_alpha": rank, "target_modules": sorted({n.split(".", 3)[3] for n in shapes})}
    packed = {f"transformer.{k}": v for k, v in config.items()}
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(packed)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--method", default="tsv")
    parser.add_argument("--space", default="core")
    parser.add_argument("--repeats", type=int, default=3, help="CLI runs; the best counts (default 3)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="coremerge-bench-flux-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        kohya_shapes, diffusers_shapes = flux_shapes()
        files = [workdir / "kohya_r16.safetensors", workdir / "diffusers_r32.safetensors",
                 workdir / "kohya_r64.safetensors"]
        if not all(f.is_file() for f in files):
            write_kohya(files[0], kohya_shapes, rank=16, alpha=8, seed=1)
            write_diffusers(files[1], diffusers_shapes, rank=32, seed=2)
            write_kohya(files[2], kohya_shapes, rank=64, alpha=32, seed=3)
        out = workdir / "merged"
        command = [sys.executable, "-m", "coremerge", "merge", *map(str, files), "--method", args.method,
                   "--space", args.space, "--output", str(out)]
        fresh_key_map_cache(workdir)
        runs = []
        for _ in range(args.repeats):
            shutil.rmtree(out, ignore_errors=True)
            runs.append(run_measured(command, REPO))
        sizes = " + ".join(f"{f.stat().st_size / 1e6:.0f}" for f in files)
        print(f"flux: {len(kohya_shapes)} kohya / {len(diffusers_shapes)} diffusers modules per adapter, "
              f"inputs {sizes} MB")
        best = min(runs, key=lambda run: run["seconds"])
        print(f"cli: {best['output'].splitlines()[-1]}")
        for i, run in enumerate(runs, start=1):
            print(f"  run {i}: {run['seconds']:.2f} s wall, {run['cpu_seconds']:.2f} s CPU (python start and imports "
                  f"included), {run['rss_gb']:.2f} GB peak RSS ({run['load']})")
        peak = max(run["rss_gb"] for run in runs)
        print(f"cli best wall: {best['seconds']:.2f} s (target <= {TARGET_SECONDS:g} s: "
              f"{met(best['seconds'] <= TARGET_SECONDS)}); peak RSS {peak:.2f} GB at most (target <= "
              f"{TARGET_RSS_GB:g} GB: {met(peak <= TARGET_RSS_GB)})")
        print_cold_and_warm(runs)
    finally:
        if not args.keep:
            shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
