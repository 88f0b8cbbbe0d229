"""The written folder: peft loads it, its deltas equal the merge, its outputs match an independent update."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

from coremerge import METHODS, MergeOptions, merge_to_folder
from coremerge.cli import main

from conftest import BASE_NAME, expected_updates, peft_deltas, read_config, tiny_llama, tiny_resnet


@pytest.mark.parametrize("space", ["core", "full", "knots"])
@pytest.mark.parametrize("method", list(METHODS))
def test_cli_output_loads_in_peft_with_the_merged_update(method, space, adapters, base_model, tmp_path, capsys):
    sources = [adapters["plain"], adapters["pattern"], adapters["named"]]
    args = ["merge", *map(str, sources), "--method", method, "--space", space, "--weights", "1", "0.5", "-0.8",
            "--output", str(tmp_path / "out")]
    assert main(args) == 0
    assert "merged 3 adapter(s)" in capsys.readouterr().out
    options = MergeOptions.create(method=method, space=space, weights=[1, 0.5, -0.8])
    expected = expected_updates(sources, options)
    deltas = peft_deltas(base_model, tmp_path / "out")
    assert sorted(deltas) == sorted(expected)
    for name, update in expected.items():
        torch.testing.assert_close(deltas[name], update.dense(), rtol=1e-4, atol=1e-6)


def test_core_ta_equals_peft_cat_combination(adapters, tmp_path):
    """peft's exact `cat` combination of the same adapters, weights included."""
    names = ["plain", "rslora", "named"]  # same targets, ranks 4 / 8 / 3, scalings 2 / sqrt(2)/2 / 2
    weights = [0.6, 1.5, -0.3]
    model = PeftModel.from_pretrained(tiny_llama(), str(adapters["plain"]), adapter_name="plain")
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.add_weighted_adapter(names, weights, adapter_name="cat", combination_type="cat")
    merge_to_folder([str(adapters[n]) for n in names], MergeOptions.create(method="ta", weights=weights),
                    tmp_path / "ours")
    ours = peft_deltas(tiny_llama(), tmp_path / "ours")
    for module_name, delta in ours.items():
        layer = model.base_model.model.get_submodule(module_name)
        torch.testing.assert_close(delta, layer.get_delta_weight("cat").double(), rtol=1e-4, atol=1e-6)


def test_merged_model_outputs_match_independently_updated_weights(adapters, tmp_path):
    """Logits of base + merged adapter == logits of a base whose weights get sum_t w_t dW_t added by hand."""
    names, weights = ["plain", "pattern", "embedding"], [1.0, 0.5, 2.0]
    merge_to_folder([str(adapters[n]) for n in names], MergeOptions.create(method="ta", weights=weights),
                    tmp_path / "out")
    merged = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out"))
    by_hand = tiny_llama()
    for name, weight in zip(names, weights):
        for module_name, delta in peft_deltas(tiny_llama(), adapters[name]).items():
            parameter = by_hand.get_submodule(module_name).weight
            change = delta.T if "embed_tokens" in module_name else delta
            parameter.data += weight * change.to(parameter.dtype)
    tokens = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, by_hand(tokens).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(merged(tokens).logits, tiny_llama()(tokens).logits, atol=1e-3)


def test_config_report_and_rank_patterns(adapters, tmp_path):
    report = merge_to_folder([str(adapters["plain"]), str(adapters["pattern"])],
                             MergeOptions.create(method="tsv"), tmp_path / "out")
    config = read_config(tmp_path / "out")
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == BASE_NAME
    assert config["use_dora"] is False
    ranks = {name: m["output_rank"] for name, m in report["modules"].items()}
    assert sorted(config["target_modules"]) == sorted(ranks)
    with safe_open(tmp_path / "out" / "adapter_model.safetensors", "pt") as handle:
        for name, rank in ranks.items():
            expected_rank = config["rank_pattern"].get(name, config["r"])
            assert handle.get_slice(f"base_model.model.{name}.lora_A.weight").get_shape()[0] == rank == expected_rank
            assert config["alpha_pattern"].get(name, config["lora_alpha"]) == expected_rank  # scaling 1
    # q_proj of layer 1: plain rank 4 + pattern rank 2; up_proj only in pattern: rank 4
    assert ranks["model.layers.1.self_attn.q_proj"] == 6 and ranks["model.layers.0.mlp.up_proj"] == 4
    assert report["modules"]["model.layers.0.mlp.up_proj"]["input_ranks"] == {str(adapters["pattern"]): 4}
    on_disk = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert on_disk == report
    assert on_disk["method"] == "tsv" and on_disk["space"] == "core" and on_disk["params"] == {}
    assert set(on_disk["seconds"]) == {"loading", "merging", "writing", "total"}
    assert on_disk["bytes"]["out"] == (tmp_path / "out" / "adapter_model.safetensors").stat().st_size
    assert [s["source"] for s in on_disk["sources"]] == [str(adapters["plain"]), str(adapters["pattern"])]


def test_output_dtype_follows_inputs_or_flag(adapters, tmp_path):
    sources = [str(adapters["plain"]), str(adapters["rslora"])]
    merge_to_folder(sources, MergeOptions.create(method="ta"), tmp_path / "same")
    merge_to_folder(sources, MergeOptions.create(method="ta", dtype="bfloat16"), tmp_path / "bf16")
    for folder, dtype in (("same", "F32"), ("bf16", "BF16")):
        with safe_open(tmp_path / folder / "adapter_model.safetensors", "pt") as handle:
            assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {dtype}


def test_rank_flag_truncates_every_module(adapters, tmp_path):
    report = merge_to_folder([str(adapters["plain"]), str(adapters["rslora"])],
                             MergeOptions.create(method="ta", rank=2), tmp_path / "out")
    assert {m["output_rank"] for m in report["modules"].values()} == {2}
    assert read_config(tmp_path / "out")["r"] == 2


@pytest.mark.parametrize("method", ["ta", "tsv"])
@pytest.mark.parametrize("kind", ["embedding", "conv", "moslora"])
def test_one_adapter_alone_round_trips(kind, method, adapters, conv_adapter, tmp_path):
    """A single adapter merged alone comes back as itself: embedding, conv kernels, MoSLoRA folded."""
    source, model = (conv_adapter, tiny_resnet) if kind == "conv" else (adapters[kind], tiny_llama)
    merge_to_folder([str(source)], MergeOptions.create(method=method), tmp_path / "out")
    original = {n: u.dense() for n, u in expected_updates([source], MergeOptions.create(method="ta")).items()}
    again = peft_deltas(model(), tmp_path / "out")
    assert sorted(original) == sorted(again)
    for name in original:
        torch.testing.assert_close(again[name], original[name], rtol=1e-5, atol=1e-6)


def test_earlier_output_is_replaced(adapters, tmp_path):
    out = tmp_path / "out"
    merge_to_folder([str(adapters["plain"])], MergeOptions.create(method="ta"), out)
    merge_to_folder([str(adapters["plain"]), str(adapters["named"])], MergeOptions.create(method="ta"), out)
    assert len(json.loads((out / "merge_report.json").read_text())["sources"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folders left


def float64_verdict(cast: torch.Tensor, exact: torch.Tensor):
    """The checks of the written factors done plainly in float64: finite, and within 1e-2 of the exact in norm."""
    if not torch.isfinite(cast).all():
        return "overflow"
    exact = exact.double()
    return "underflow" if torch.linalg.vector_norm(cast.double() - exact) > 1e-2 * torch.linalg.vector_norm(exact) \
        else None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e-5, 5e-6, 3e-6, 2e-6, 1e-6, 5e-7, 1e-7, 1e-9, 1e-30, 0.0, 1e4, 6e4, 1e30, 1e38])
def test_the_fast_rounding_check_decides_as_float64(dtype, scale):
    """rounding_verdict (settled by the norm alone, else by float32 norms, float64 only near the threshold) gives
    the plain float64 verdict, from flushed-to-zero through subnormal (fp16 from ~6e-5 down) to overflowing."""
    from coremerge.formats.peft_export import rounding_verdict

    exact = torch.randn(300, 40, generator=torch.Generator().manual_seed(0)) * scale
    cast = exact.to(dtype)
    assert rounding_verdict(cast, exact) == float64_verdict(cast, exact)
    exact[3, 5] = float("nan")
    assert rounding_verdict(exact.to(dtype), exact) == "overflow"
