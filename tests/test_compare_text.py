"""Text side by side: one loaded causal LM, adapters switched on it, answers equal to separately loaded models."""

import torch
from conftest import lora, save_adapter
from peft import PeftModel
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

from coremerge.comparison.runners import CausalLMRunner
from coremerge.comparison.side_by_side import Variant, compare_text
from coremerge.webapp.render import text_html

PROMPTS = ["upper: abc\n", "a somewhat longer prompt: xyz\n"]


def byte_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(config).eval()


def greedy(model, tokenizer, prompts, max_new_tokens):
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def test_compare_text_switches_adapters_on_one_model_and_matches_separate_loads(tmp_path):
    base_folder = tmp_path / "base"
    byte_llama().save_pretrained(base_folder)
    tokenizer = ByT5Tokenizer(extra_ids=0)
    tokenizer.save_pretrained(base_folder)
    folders = [save_adapter(tmp_path / name, lora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                            seed=seed, model=LlamaForCausalLM.from_pretrained(base_folder))
               for name, seed in (("first", 11), ("second", 12))]

    runner = CausalLMRunner(str(base_folder), max_new_tokens=6)
    variants = [Variant("Base"), Variant("First", str(folders[0])), Variant("Merged", str(folders[1]))]
    comparison = compare_text(runner, PROMPTS, variants)

    expected = [greedy(LlamaForCausalLM.from_pretrained(base_folder).eval(), tokenizer, PROMPTS, 6)]
    for folder in folders:
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_folder), str(folder)).eval()
        expected.append(greedy(model, tokenizer, PROMPTS, 6))
    assert comparison.variants == ["Base", "First", "Merged"]
    assert comparison.outputs == [list(column) for column in zip(*expected)]
    assert expected[0] != expected[1]  # the adapters do change the answers
    assert str(folders[1]) not in runner.loaded  # the merged adapter is unloaded after the comparison

    page = text_html(comparison)
    assert page.count("<tr>") == 1 + len(PROMPTS) and "a somewhat longer prompt: xyz</td>" in page


def test_expected_answers_mark_each_column_and_score_it():
    from coremerge.comparison.side_by_side import TextComparison

    comparison = TextComparison(["Base", "Adapter", "Merged"], ["even? 12\n", "even? 7\n", "free text\n"],
                                [["", "yes", "yes"], ["", "no", "yes"], ["x", "y", "z"]], ["yes", "no", None])
    assert [comparison.right(0, v) for v in range(3)] == [False, True, True]
    assert comparison.right(2, 1) is None  # no expected answer: not marked
    assert comparison.scores == [0.0, 1.0, 0.5]  # over the two prompts that have an expected answer
    page = text_html(comparison)
    assert "<th>expected</th>" in page and "exact match on these prompts" in page
    assert "<th>0%</th><th>100%</th><th>50%</th>" in page
    assert page.count("cm-right") - 1 == 3 and page.count("cm-wrong") - 1 == 3  # minus the style sheet's rule
    plain = text_html(TextComparison(["Base"], ["free text\n"], [["x"]]))
    assert "expected" not in plain and "exact match" not in plain and "cm-right\"" not in plain
