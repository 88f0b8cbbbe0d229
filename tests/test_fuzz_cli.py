"""Seeded random mutations of valid peft adapters (config values and types, tensor dtypes, shapes and values,
missing and extra keys, flags, an occupied --output). Every case ends one of two ways:

- exit 0, and the written adapter's update equals alpha * sum_t w_t s_t B_t A_t computed here from the inputs'
  files (not by coremerge's code), and peft loads it with that update wherever its shapes fit the base model;
- exit 2 with exactly one stderr line and no traceback, and no output folder or staging leftovers.

Either way no file outside the output folder changed. Cases run `coremerge merge` in-process (main), so the
test stays fast; test_hardening.py runs real processes for the exit codes.
"""

import json
import os
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file

from coremerge.cli import main

from conftest import peft_deltas

SEED = int(os.environ.get("COREMERGE_FUZZ_SEED", 15))
CASES = int(os.environ.get("COREMERGE_FUZZ_CASES", 60))
PREFIX = "base_model.model."
VALUES = [None, True, False, "x", "", "8", -1, 0, 0.5, 1, 2, 4, 8, 16, 1e308, float("nan"), float("inf"),
          -float("inf"), [], {}, [4], {"q_proj": 2}, {"v_proj": "2"}, {"q_proj": float("nan")},
          {"layers.0.self_attn.q_proj": 8}, {"v_proj": 1e-300}, 10**30]
CONFIG_KEYS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "peft_type", "task_type",
               "base_model_name_or_path", "target_modules", "fan_in_fan_out", "lora_dropout", "use_dora", "notes"]
DTYPES = [torch.int8, torch.int32, torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float64]
EXTRA_KEYS = [
    "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight",  # an A without its B
    "base_model.model.lm_head.weight",  # modules_to_save style: ignored with a warning
    "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",  # DoRA
    "base_model.model.model.layers.1.self_attn.q_proj.lora_A.second.weight",  # a second adapter name
]


def mutate_config(rng, folder: Path) -> str:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    key = rng.choice(CONFIG_KEYS)
    if rng.random() < 0.2:
        config.pop(key, None)
        what = f"config: no {key}"
    else:
        config[key] = rng.choice(VALUES)
        what = f"config: {key} = {config[key]!r}"
    path.write_text(json.dumps(config))  # NaN and Infinity written as JSON's readers accept them
    return what


def mutate_tensors(rng, folder: Path) -> str:
    path = folder / "adapter_model.safetensors"
    try:
        tensors = load_file(path)
    except Exception:  # noqa: BLE001 - truncated by an earlier mutation of this case
        return "tensors: (already truncated)"
    key = rng.choice(sorted(tensors))
    op = rng.choice(["dtype", "flatten", "unsqueeze", "transpose", "drop_row", "drop_column", "value", "scale",
                     "delete", "extra", "truncate"])
    t = tensors[key]
    if op == "dtype":
        dtype = rng.choice(DTYPES)
        tensors[key] = (t * 50).to(dtype)
        op = f"dtype {dtype}"
    elif op == "flatten":
        tensors[key] = t.reshape(-1)
    elif op == "unsqueeze":
        tensors[key] = t[None]
    elif op == "transpose":
        tensors[key] = t.T.contiguous()
    elif op == "drop_row":
        tensors[key] = t[1:].contiguous()
    elif op == "drop_column":
        tensors[key] = t[:, 1:].contiguous()
    elif op == "value":
        value = rng.choice([float("nan"), float("inf"), 1e38, 6e4, -1e20])
        t = t.clone()
        t.view(-1)[rng.randrange(t.numel())] = value
        tensors[key] = t
        op = f"value {value}"
    elif op == "scale":
        factor = rng.choice([1e-30, 1e15, 1e30])
        tensors[key] = t * factor
        op = f"scale {factor}"
    elif op == "delete":
        del tensors[key]
    elif op == "extra":
        key = rng.choice(EXTRA_KEYS)
        tensors[key] = torch.randn(4, 32)
    if op == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: rng.randrange(len(data))])
    else:
        save_file(tensors, path)
    return f"tensors: {op} {key}"


def mutate_flags(rng) -> list[str]:
    flags = []
    if rng.random() < 0.5:
        flags += ["--alpha", rng.choice(["0.5", "-2", "1e20", "1e300", "nan", "inf", "3"])]
    if rng.random() < 0.4:
        flags += ["--dtype", rng.choice(["float16", "bfloat16", "float32"])]
    return flags


def folder_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """Each module's s * B @ A (float64) read straight from a peft folder, patterns resolved as peft does."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    deltas = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        rank = a.shape[0]
        alpha = config["lora_alpha"]
        if config.get("alpha_pattern"):
            alpha = config["alpha_pattern"].get(get_pattern_key(config["alpha_pattern"].keys(), name), alpha)
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        deltas[name] = scale * (b.double() @ a.double())
    return deltas


def snapshot(root: Path, skip: str) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mode, p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*")) if not p.relative_to(root).parts[0].startswith((skip, f".{skip}"))}


def fits_base(base_model, deltas: dict) -> bool:
    modules = dict(base_model.named_modules())
    return all(name in modules and tuple(modules[name].weight.shape) == tuple(d.shape) for name, d in deltas.items())


def run_case(index: int, rng, root: Path, adapters, capsys) -> tuple[str, int]:
    inputs = root / "inputs"
    sources = [Path(shutil.copytree(adapters[rng.choice(["plain", "rslora", "pattern"])], inputs / "a"))]
    if rng.random() < 0.5:
        sources.append(Path(shutil.copytree(adapters[rng.choice(["plain", "rslora"])], inputs / "b")))
    changes = [rng.choice([mutate_config, mutate_tensors])(rng, sources[0]) for _ in range(rng.choice([1, 1, 2]))]
    flags = mutate_flags(rng)
    weights = [rng.choice([1.0, 0.5, -1.0, 2.0]) for _ in sources]
    out = root / "out"
    if rng.random() < 0.15:  # an occupied output folder: a user's file must survive
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        changes.append("output holds notes.txt")
    before = snapshot(root, "out")
    capsys.readouterr()  # drop what peft printed while checking the previous case
    try:
        code = main(["merge", *map(str, sources), "--method", "ta", "--weights", *map(str, weights), *flags,
                     "--output", str(out)])
    except SystemExit as exited:
        code = exited.code
    captured = capsys.readouterr()
    what = f"case {index}: {changes} {flags} weights {weights}"
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err, what
    assert snapshot(root, "out") == before, what
    assert not [p for p in root.iterdir() if p.name.startswith(".out")], what
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("coremerge: error: "), (what, lines)
        if (out / "notes.txt").exists():
            assert (out / "notes.txt").read_text() == "mine"
        else:
            assert not out.exists(), what
        return what, code
    assert code == 0, (what, code, lines)
    assert all(line.startswith("coremerge: warning: ") for line in lines), (what, lines)
    alpha = float(flags[flags.index("--alpha") + 1]) if "--alpha" in flags else 1.0
    expected: dict[str, torch.Tensor] = {}
    sizes: dict[str, float] = {}
    for weight, source in zip(weights, sources):
        for name, delta in folder_deltas(source).items():
            expected[name] = expected.get(name, 0) + alpha * weight * delta
            sizes[name] = sizes.get(name, 0.0) + abs(alpha * weight) * float(torch.linalg.norm(delta))
    expected = {name: d for name, d in expected.items() if torch.linalg.norm(d) > 1e-12 * sizes[name]}  # cancelled
    written = folder_deltas(out)
    assert written.keys() == expected.keys(), what
    tolerance = 1e-2 if "--dtype" in flags and flags[flags.index("--dtype") + 1] != "float32" else 1e-5
    for name, delta in expected.items():
        error = torch.linalg.norm(written[name] - delta) / torch.linalg.norm(delta)
        assert error <= tolerance, (what, name, float(error))
    return what, code


def test_random_mutations_end_in_a_correct_adapter_or_one_line(tmp_path, adapters, base_model, capsys):
    rng = random.Random(SEED)
    outcomes = []
    for index in range(CASES):
        root = tmp_path / f"case{index}"
        root.mkdir()
        what, code = run_case(index, rng, root, adapters, capsys)
        outcomes.append(code)
        if code == 0 and fits_base(base_model, folder_deltas(root / "out")):
            loaded, written = peft_deltas(base_model, root / "out"), folder_deltas(root / "out")
            for name, delta in written.items():
                assert torch.allclose(loaded[name], delta, rtol=1e-4, atol=1e-6), (what, name)
        shutil.rmtree(root)
    assert outcomes.count(0) >= CASES // 6 and outcomes.count(2) >= CASES // 3, outcomes  # both endings occur
    print(f"{CASES} cases: {outcomes.count(0)} merged, {outcomes.count(2)} refused")
