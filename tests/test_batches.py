"""Same-shaped modules merged as one batch (core space): each module comes out as its own merge would.

The adapters are real peft adapters of a four-layer tiny Llama. One adapter's layer-2 q_proj is made rank-deficient
(TSV then keeps fewer triplets there than in the other q_proj modules, so that batch is merged module by module)
and its layer-3 v_proj ill-conditioned (its B stack takes the QR route, so the whole v_proj batch does); the up_proj
batch is left as peft made it (the Gram route), with other alphas in two of its layers: layer 0's is huge in every
adapter (its noise floor is above the other modules' singular values, so each module must keep its own), layer 1's
differs in one adapter (each module's B~ has its own scalings).
"""

from contextlib import ExitStack

import pytest
import torch
from safetensors.torch import load_file, save_file

from coremerge import MergeOptions, load_adapters, merge_adapters, merge_module, to_lora
from coremerge.errors import AdapterFormatError
from coremerge.merging import merge
from coremerge.merging.linalg import NotUniform, left_singular_basis
from coremerge.merging.merge import module_batches, module_generator, module_names, read_batch
from coremerge.merging.methods import METHODS
from coremerge.merging.spaces import merge_batch, to_loras

from conftest import lora, save_adapter, tiny_llama

WEIGHTS = [1.0, -0.6, 1.3]
RANK_DEFICIENT = "model.layers.2.self_attn.q_proj"
ILL_CONDITIONED = "model.layers.3.self_attn.v_proj"


def edit_tensors(folder, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    root = tmp_path_factory.mktemp("batches")
    targets = ["q_proj", "v_proj", "up_proj"]
    huge = {"layers.0.mlp.up_proj": 1e15}
    folders = [save_adapter(root / name, lora(r=r, lora_alpha=2 * r, target_modules=targets, alpha_pattern=pattern),
                            seed=seed, model=tiny_llama(layers=4))
               for name, r, seed, pattern in (("first", 4, 11, {**huge, "layers.1.mlp.up_proj": 1.0}),
                                              ("second", 8, 12, huge), ("third", 4, 13, huge))]

    def degrade(tensors):
        prefix = "base_model.model.model.layers"
        b = tensors[f"{prefix}.2.self_attn.q_proj.lora_B.weight"]
        b[:, 1] = b[:, 0]  # two equal columns: B A has rank 7 of 8
        tensors[f"{prefix}.3.self_attn.v_proj.lora_B.weight"][:, 0] *= 1e-6  # condition ~1e6: no Gram route

    edit_tensors(folders[1], degrade)
    return load_adapters([str(folder) for folder in folders])


def read(adapters, names):
    with ExitStack() as files:
        readers = [files.enter_context(adapter.open()) for adapter in adapters]
        return read_batch(adapters, readers, [0, 1, 2], names, WEIGHTS)


def read_alone(adapters, name):
    """The module's tasks as the one-module reader gives them."""
    tasks = []
    for adapter, weight in zip(adapters, WEIGHTS):
        with adapter.open() as reader:
            tasks.append(adapter.read_factors(reader, name, weight))
    return tasks


def names_ending(adapters, suffix):
    return [name for name in module_names(adapters) if name.endswith(suffix)]


def test_batches_group_same_shaped_modules_in_the_order_of_their_first_one(four_layers):
    names = module_names(four_layers)
    batches = module_batches(four_layers, names)
    assert names[:3] == ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj",
                         "model.layers.0.self_attn.v_proj"]
    assert batches == [names_ending(four_layers, suffix) for suffix in ("up_proj", "q_proj", "v_proj")]
    # the byte limit: a q_proj's float64 factors are (32 + 32) x 16 x 8 bytes, an up_proj's (64 + 32) x 16 x 8
    assert module_batches(four_layers, names, limit=2 * 64 * 16 * 8) == [
        [names[0]], [names[1], names[4]], [names[2], names[5]], [names[3]], [names[6]], [names[7], names[10]],
        [names[8], names[11]], [names[9]]]
    assert module_batches(four_layers, names, limit=0) == [[name] for name in names]


def test_modules_targeted_by_other_adapters_or_ranks_are_not_batched_together(adapters):
    loaded = load_adapters([str(adapters["plain"]), str(adapters["pattern"])])  # pattern: layers.1 q_proj rank 2
    batches = module_batches(loaded, module_names(loaded))
    by_name = {name: batch for batch in batches for name in batch}
    q0, q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    up0, up1 = "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"  # the pattern adapter's only
    v0 = "model.layers.0.self_attn.v_proj"
    assert by_name[q0] == [q0] and by_name[q1] == [q1]
    assert by_name[up0] == [up0, up1] and up0 not in by_name[v0]
    assert sorted(name for batch in batches for name in batch) == module_names(loaded)


CASES = [(name, {}) for name in METHODS] + [
    ("tsv", {"isotropize": True}), ("tsv", {"rank": 5}), ("ta", {"alpha": -0.7}), ("iso_c", {"alpha": 1.7}),
    ("dare", {"seed": 5, "density": 0.5}),
]


@pytest.mark.parametrize("suffix", ["up_proj", "v_proj", "q_proj"])
@pytest.mark.parametrize("method, flags", CASES, ids=[f"{m}-{'-'.join(map(str, f.items()))}" for m, f in CASES])
def test_a_batch_merges_each_module_as_it_merges_alone(four_layers, method, flags, suffix):
    names = names_ending(four_layers, suffix)
    options = MergeOptions.create(method=method, **flags)
    tasks, stacks = read(four_layers, names)
    generators = [module_generator(0, n) for n in names]
    if method == "tsv" and suffix == "q_proj":  # a rank-deficient module: the next test
        with pytest.raises(NotUniform):
            merge_batch(tasks, options, generators, stacks)
        return
    batched = to_loras(merge_batch(tasks, options, generators, stacks), options.rank)
    assert len(batched) == len(names)
    for name, (lora_b, lora_a) in zip(names, batched):
        alone_b, alone_a = to_lora(merge_module(read_alone(four_layers, name), options, module_generator(0, name)),
                                   options.rank)
        assert lora_b.shape == alone_b.shape and lora_a.shape == alone_a.shape
        expected = alone_b @ alone_a
        torch.testing.assert_close(lora_b @ lora_a, expected, rtol=0, atol=1e-12 * expected.abs().max())


def test_a_batch_with_an_ill_conditioned_stack_takes_the_qr_route_for_all(four_layers):
    names = names_ending(four_layers, "v_proj")
    _, stacks = read(four_layers, names)
    basis, coordinates = left_singular_basis(stacks.b)
    assert basis.factor is not stacks.b  # QR route (the Gram route keeps the stack as its factor)
    well_conditioned = stacks.b[[g for g, name in enumerate(names) if name != ILL_CONDITIONED]]
    assert left_singular_basis(well_conditioned)[0].factor is well_conditioned
    for g in range(len(names)):  # the same basis and coordinates as each stack alone (up to column signs)
        alone, alone_coordinates = left_singular_basis(stacks.b[g])
        signs = torch.sign(torch.sum(basis.dense()[g] * alone.dense(), dim=0))
        torch.testing.assert_close(basis.dense()[g] * signs, alone.dense(), rtol=0, atol=1e-10)
        torch.testing.assert_close(coordinates[g] * signs[:, None], alone_coordinates, rtol=0, atol=1e-10)


def test_tsv_keeping_different_ranks_in_a_batch_is_merged_module_by_module(four_layers, monkeypatch):
    names = names_ending(four_layers, "q_proj")
    options = MergeOptions.create(method="tsv")
    tasks, stacks = read(four_layers, names)
    with pytest.raises(NotUniform):
        merge_batch(tasks, options, [module_generator(0, n) for n in names], stacks)
    batched = {m.name: m for m in merge_adapters(four_layers, options, workers=1)}
    monkeypatch.setattr(merge, "BATCH_BYTES", 0)
    for module in merge_adapters(four_layers, options, workers=1):
        expected = module.lora_b @ module.lora_a
        torch.testing.assert_close(batched[module.name].lora_b @ batched[module.name].lora_a, expected,
                                   rtol=0, atol=1e-12 * expected.abs().max())
    assert batched[RANK_DEFICIENT].rank == 15 and batched["model.layers.1.self_attn.q_proj"].rank == 16


def test_modules_of_a_batch_keep_their_own_export_ranks(four_layers):
    names = names_ending(four_layers, "q_proj")
    tasks, stacks = read(four_layers, names)
    options = MergeOptions.create(method="ta")  # batched; the rank-deficient task makes its module's sum rank 15
    update = merge_batch(tasks, options, [module_generator(0, n) for n in names], stacks)
    assert [lora_b.shape[1] for lora_b, _ in to_loras(update)] == [16, 16, 15, 16]
    assert [lora_a.shape[0] for _, lora_a in to_loras(update, max_rank=15)] == [15, 15, 15, 15]


def test_a_non_finite_factor_in_a_batch_names_its_tensor(four_layers, tmp_path):
    folder = save_adapter(tmp_path / "nan", lora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
                          seed=14,
                          model=tiny_llama(layers=4))
    key = "base_model.model.model.layers.2.self_attn.v_proj.lora_A.weight"  # the third module of its batch
    edit_tensors(folder, lambda tensors: tensors[key].__setitem__((0, 3), float("inf")))
    loaded = load_adapters([str(four_layers[0].weights_path.parent), str(folder)])
    assert len(module_batches(loaded, module_names(loaded))) == 3
    with pytest.raises(AdapterFormatError) as caught:
        list(merge_adapters(loaded, MergeOptions.create(method="tsv")))
    assert str(caught.value) == f"{folder}: tensor {key} contains NaN or Inf values"


def test_a_method_with_randomness_cannot_be_registered_as_batched():
    from coremerge.merging.methods import Method, register

    with pytest.raises(ValueError, match="method dare_batched: a batched method cannot give each module"):
        register(Method("dare_batched", "DARE", "", "", METHODS["dare"].function, batched=True))
    assert "dare_batched" not in METHODS
