"""Where a merge computes: the same code on cpu or cuda, in float64, with the written factors back on the CPU."""

import pytest
import torch
from safetensors.torch import load_file

from coremerge import CoreMergeError, MergeOptions
from coremerge.cli import main
from coremerge.merging.to_folder import merge_to_folder

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def merged(adapters, tmp_path, name, device, **options):
    sources = [str(adapters[k]) for k in ("plain", "rslora", "pattern")]
    merge_to_folder(sources, MergeOptions.create(**options), tmp_path / name, device=device)
    return load_file(tmp_path / name / "adapter_model.safetensors")


@pytest.mark.parametrize("device", ["gpu", "mps", "cuda:x"])
def test_a_device_that_is_no_merge_device_is_named(device, adapters, tmp_path):
    with pytest.raises(CoreMergeError, match=rf"^device '{device}': "):
        merged(adapters, tmp_path, "out", device)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_says_so(adapters, tmp_path):
    with pytest.raises(CoreMergeError, match=r"^device 'cuda': CUDA is not available on this machine; use cpu$"):
        merged(adapters, tmp_path, "out", "cuda")


@pytest.mark.parametrize("device, problem", [
    ("mps", "merges run on cpu or cuda"),
    ("tpu", "not a torch device; use cpu or cuda"),
    ("cuda:x", "not a torch device; use cpu or cuda"),
    pytest.param("cuda", "CUDA is not available on this machine; use cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_the_cli_names_a_bad_device_and_exits_2(device, problem, adapters, tmp_path, capsys):
    args = ["merge", str(adapters["plain"]), str(adapters["rslora"]), "--output", str(tmp_path / "out"),
            "--device", device]
    assert _exit_code(args) == 2
    assert capsys.readouterr().err == f"coremerge: error: device {device!r}: {problem}\n"
    assert not (tmp_path / "out").exists()


def test_the_cli_merges_on_the_cpu_device_as_by_default(adapters, tmp_path):
    sources = [str(adapters["plain"]), str(adapters["rslora"])]
    assert _exit_code(["merge", *sources, "--output", str(tmp_path / "default")]) == 0
    assert _exit_code(["merge", *sources, "--output", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    default = load_file(tmp_path / "default" / "adapter_model.safetensors")
    cpu = load_file(tmp_path / "cpu" / "adapter_model.safetensors")
    assert default.keys() == cpu.keys() and all(torch.equal(default[k], cpu[k]) for k in default)


def _exit_code(args):
    try:
        return main(args)
    except SystemExit as stop:
        return stop.code


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("method, space, params", [("tsv", "core", {}), ("ta", "full", {}), ("ties", "knots", {}),
                                                   ("dare", "core", {"density": 0.7})])
def test_cuda_gives_the_cpu_merge(method, space, params, adapters, tmp_path):
    """float64 on both; dare's mask is drawn on the CPU generator, so the seed means the same on both."""
    cpu = merged(adapters, tmp_path, "cpu", "cpu", method=method, space=space, **params)
    cuda = merged(adapters, tmp_path, "cuda", "cuda", method=method, space=space, **params)
    assert cpu.keys() == cuda.keys()
    for key in cpu:
        torch.testing.assert_close(cuda[key], cpu[key], rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_the_gpu_check_says_there_is_no_cuda_and_exits_0():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert done.stdout == "gpu_check: no CUDA device on this machine; nothing to check here (exit 0)\n"
