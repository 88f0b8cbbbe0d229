"""Every method in every space, through the CLI's written adapter, against the independent reference.

The sources are real peft adapters saved by peft (mixed ranks 4 / 8 / 4-and-2 / 4, rsLoRA, rank and alpha
patterns, a MoSLoRA mixer). Their canonical factors are read here with peft itself (lora_A, lora_B, scaling)
plus the mixer from the file, never with coremerge; the merged adapter is loaded by peft and each module's
update read back with peft's get_delta_weight.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from coremerge import MergeOptions, TaskFactors, merge_module, to_lora
from coremerge.cli import main
from coremerge.merging.merge import module_generator

import reference_merge as ref
from conftest import peft_deltas

SOURCES = ("plain", "rslora", "pattern", "moslora")  # ranks 4, 8, 4 (2 in layers.1 q_proj), 4
WEIGHTS = (1.0, 0.7, -0.6, 1.3)

# (method, flags): the defaults, then one parameter changed at a time (the test below checks each change matters)
CASES = [
    ("ta", {}),
    ("ta", {"alpha": 0.5, "isotropize": True}),
    ("ta", {"rank": 3}),
    ("ties", {}),
    ("ties", {"density": 0.6}),
    ("dare", {}),
    ("dare", {"density": 0.4}),
    ("dare", {"seed": 7}),
    ("dare_ties", {}),
    ("dare_ties", {"density": 0.5}),
    ("dare_ties", {"density": 0.5, "seed": 3}),
    ("tsv", {}),
    ("tsv", {"isotropize": True}),  # (not with --rank: a flat spectrum has no unique best rank-k part)
    ("tsv", {"rank": 5}),
    ("iso_c", {}),
    ("iso_c", {"alpha": 1.7}),
    ("iso_cts", {}),
    ("iso_cts", {"common_fraction": 0.3}),
    ("cart", {}),
    ("cart", {"rank_fraction": 0.3}),
    ("cart", {"cart_lambda": 2.0}),
]
SPACES = ("core", "full", "knots")
CASE_IDS = [f"{m}-{'-'.join(f'{k}{v}' for k, v in f.items()) or 'defaults'}" for m, f in CASES]


def canonical_factors(folder, base_model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{module: (B~, A~)} as peft reads the adapter: B~ = scaling * lora_B (@ lora_AB for MoSLoRA), A~ = lora_A."""
    tensors = load_file(next(folder.glob("adapter_model.safetensors")))
    model = PeftModel.from_pretrained(base_model, str(folder), adapter_name="src")
    factors = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "src" in module.lora_A:
            a = module.lora_A["src"].weight.detach().double().numpy()
            b = module.lora_B["src"].weight.detach().double().numpy()
            mixer = tensors.get(f"base_model.model.{name}.lora_AB.weight")
            if mixer is not None:
                b = b @ mixer.double().numpy()
            factors[name] = (module.scaling["src"] * b, a)
    model.unload()
    return factors


@pytest.fixture(scope="module")
def task_factors(adapters, base_model):
    """{module: [(B~_t, A~_t), ...], [weights]} over the adapters that target the module, in source order."""
    per_source = [canonical_factors(adapters[k], base_model) for k in SOURCES]
    names = sorted(set().union(*per_source))
    return {name: ([f[name] for f in per_source if name in f], [w for f, w in zip(per_source, WEIGHTS) if name in f])
            for name in names}


def reference_updates(task_factors, method, space, flags):
    flags = dict(flags)
    options = {k: flags.pop(k) for k in ("alpha", "isotropize", "rank") if k in flags}
    return {name: ref.merge(factors, method, space, weights=weights, module=name, **options, **flags)
            for name, (factors, weights) in task_factors.items()}


def cli_args(sources, method, space, flags, output):
    args = ["merge", *map(str, sources), "--method", method, "--space", space,
            "--weights", *map(str, WEIGHTS), "--output", str(output)]
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


def assert_matches(deltas, expected, label):
    assert sorted(deltas) == sorted(expected), label
    for name, reference in expected.items():
        got = deltas[name].numpy()
        scale = np.abs(reference).max()
        # the adapter is written in float32: agreement to float32 rounding of the largest entry
        assert np.abs(got - reference).max() <= 2e-5 * scale + 1e-9, (label, name, np.abs(got - reference).max(), scale)


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("method, flags", CASES, ids=CASE_IDS)
def test_cli_merge_equals_reference(method, flags, space, adapters, base_model, task_factors, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(cli_args([adapters[k] for k in SOURCES], method, space, flags, out)) == 0
    capsys.readouterr()
    assert_matches(peft_deltas(base_model, out), reference_updates(task_factors, method, space, flags),
                   (method, space, flags))


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("method, flags", CASES, ids=CASE_IDS)
def test_library_merge_equals_reference(method, flags, space, task_factors):
    """The same cases through merge_module and to_lora in float64 (no file, no peft): fast, and tight."""
    expected = reference_updates(task_factors, method, space, flags)
    options = MergeOptions.create(method=method, space=space, weights=WEIGHTS, **flags)
    for name, (factors, weights) in task_factors.items():
        tasks = [TaskFactors(a=torch.from_numpy(a), b=torch.from_numpy(b), weight=w)
                 for (b, a), w in zip(factors, weights)]
        generator = module_generator(options.params.get("seed", 0), name)
        lora_b, lora_a = to_lora(merge_module(tasks, options, generator), options.rank)
        got, reference = (lora_b @ lora_a).numpy(), expected[name]
        assert np.abs(got - reference).max() <= 1e-9 * np.abs(reference).max(), (method, space, flags, name)


@pytest.mark.parametrize("space", SPACES)
def test_float32_factors_are_merged_in_float64(space, task_factors):
    """merge_module upcasts the factors it is given: float32 factors give the float64 answer of the same values."""
    name = "model.layers.0.self_attn.q_proj"
    factors, weights = task_factors[name]
    rounded = [(b.astype(np.float32).astype(np.float64), a.astype(np.float32).astype(np.float64)) for b, a in factors]
    options = MergeOptions.create(method="tsv", space=space, weights=WEIGHTS)
    tasks = [TaskFactors(a=torch.from_numpy(a).float(), b=torch.from_numpy(b).float(), weight=w)
             for (b, a), w in zip(rounded, weights)]
    lora_b, lora_a = to_lora(merge_module(tasks, options, module_generator(0, name)))
    reference = ref.merge(rounded, "tsv", space, weights=weights, module=name)
    assert np.abs((lora_b @ lora_a).numpy() - reference).max() <= 1e-9 * np.abs(reference).max()


@pytest.mark.parametrize("space", SPACES)
def test_factors_come_out_in_the_asked_dtype(space, task_factors):
    """to_lora's final products run in the asked dtype (float32 when the adapter is written in 16 bits)."""
    name = "model.layers.0.self_attn.q_proj"
    factors, weights = task_factors[name]
    tasks = [TaskFactors(a=torch.from_numpy(a), b=torch.from_numpy(b), weight=w) for (b, a), w in zip(factors, weights)]
    update = merge_module(tasks, MergeOptions.create(method="ta", space=space), module_generator(0, name))
    exact = to_lora(update)
    single = to_lora(update, dtype=torch.float32)
    assert [t.dtype for t in exact] == [torch.float64] * 2 and [t.dtype for t in single] == [torch.float32] * 2
    torch.testing.assert_close((single[0] @ single[1]).double(), exact[0] @ exact[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("space", SPACES)
def test_each_varied_parameter_changes_the_result(space, task_factors):
    """The cases above are not vacuous: each varied parameter changes the reference's answer."""
    by_method: dict[str, list] = {}
    for method, flags in CASES:
        by_method.setdefault(method, []).append(reference_updates(task_factors, method, space, flags))
    for method, results in by_method.items():
        for i, first in enumerate(results):
            for second in results[i + 1:]:
                differences = [np.abs(first[n] - second[n]).max() / np.abs(first[n]).max() for n in first]
                assert max(differences) > 1e-3, (method, space)


def test_spaces_agree_or_differ_as_the_math_says(task_factors):
    """ta, tsv and iso_c give one answer in core and full space; ties and dare do not (element-wise)."""
    for method in ("ta", "tsv", "iso_c", "iso_cts", "ties", "dare"):
        core = reference_updates(task_factors, method, "core", {})
        full = reference_updates(task_factors, method, "full", {})
        gap = max(np.abs(core[n] - full[n]).max() / np.abs(full[n]).max() for n in core)
        assert (gap < 1e-9) == (method in ("ta", "tsv", "iso_c", "iso_cts")), (method, gap)


def test_real_process_writes_the_reference_merge(adapters, base_model, task_factors, tmp_path):
    """`python -m coremerge merge` in a real process: the same answer as in-process."""
    flags = {"density": 0.5, "seed": 11}
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "coremerge",
                             *cli_args([adapters[k] for k in SOURCES], "dare_ties", "core", flags, out)[0:]],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert_matches(peft_deltas(base_model, out), reference_updates(task_factors, "dare_ties", "core", flags),
                   "subprocess")


def test_reference_reads_the_same_updates_as_peft(adapters, base_model, task_factors):
    """The factors read here give peft's own per-adapter updates (MoSLoRA: peft ignores the mixer, so skipped)."""
    for kind in SOURCES[:3]:
        deltas = peft_deltas(base_model, adapters[kind])
        own = canonical_factors(adapters[kind], base_model)
        for name, delta in deltas.items():
            b, a = own[name]
            np.testing.assert_allclose(b @ a, delta.numpy(), rtol=1e-6, atol=1e-7)
