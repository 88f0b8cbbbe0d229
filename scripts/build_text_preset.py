"""Rebuild the bundled text preset (presets/strings/) from scratch, seeded, offline, on CPU.

    python scripts/build_text_preset.py [--output presets/strings] [--threads 1] [--reuse-base]

1. Pretrain a tiny byte-level Llama on Python's own documentation text (pydoc_data.topics) as a plain LM,
   then on the same text plus copy drills (`copy: abc\\n` -> `abc\\n`, training inputs only).
2. Train one LoRA adapter (r=8, attention and MLP linears) per string task of coremerge.bundled.strings,
   on its own task's prompts and on prompts with made-up task names answered by copying, so that each
   adapter acts on its own prompts only (no other task's data is seen).
3. Evaluate the base, every adapter and a TSV merge on every task's test split; write accuracy.json
   and the manifest.

The base is named coremerge/strings-base (not its folder) before peft sees it, so that the adapters'
base_model_name_or_path does not depend on where the preset was built.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded (set before huggingface_hub is imported)

import argparse
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from pydoc_data.topics import topics
from tqdm import tqdm

from coremerge import MergeOptions, merge_to_folder
from coremerge.bundled import strings
from coremerge.bundled.reproducible import make_reproducible
from coremerge.presets import MANIFEST_NAME, write_manifest

ROOT = Path(__file__).resolve().parent.parent
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_LR = 3e-3
STEPS_FACTOR = {"double": 2}  # doubling letters (a longer answer) needs longer training to reach 95 %


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, batches, steps: int, peak_lr: float, description: str) -> None:
    """AdamW on the model's trainable parameters; `batches(step)` gives the keyword arguments of one
    forward pass, or a list of them whose losses are added."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=peak_lr, weight_decay=0.0)
    model.train()
    bar = tqdm(range(steps), desc=description, unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr, warmup=max(1, steps // 20))
        batch = batches(step)
        loss = sum(model(**b).loss for b in (batch if isinstance(batch, list) else [batch]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def text_batches(text: bytes, batch_size: int, generator: torch.Generator):
    """Random windows of the text as byte ids (the tokenizer's: byte + 3)."""
    ids = torch.tensor(list(text), dtype=torch.long) + 3
    length = strings.MAX_POSITIONS

    def batch(step: int) -> dict:
        starts = torch.randint(0, len(ids) - length, (batch_size,), generator=generator)
        windows = torch.stack([ids[s:s + length] for s in starts.tolist()])
        return {"input_ids": windows, "labels": windows}

    return batch


def train_word(rng: random.Random) -> str:
    while True:
        word = strings.random_word(rng)
        if strings.split_of(word) == "train":
            return word


def encode_examples(pairs: list[tuple[str, str]]) -> dict:
    """(prompt, answer) pairs as one batch: loss on the answer only, padded on the right."""
    tok = strings.tokenizer()
    prompts = [tok.encode(prompt, add_special_tokens=False) for prompt, _ in pairs]
    answers = [tok.encode(answer, add_special_tokens=False) for _, answer in pairs]
    width = max(len(p) + len(a) for p, a in zip(prompts, answers))
    input_ids = torch.full((len(pairs), width), tok.pad_token_id)
    labels = torch.full((len(pairs), width), -100)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (p, a) in enumerate(zip(prompts, answers)):
        input_ids[row, :len(p) + len(a)] = torch.tensor(p + a)
        labels[row, len(p):len(p) + len(a)] = torch.tensor(a)
        mask[row, :len(p) + len(a)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def task_batches(task: str, batch_size: int, rng: random.Random):
    """Random training inputs of one task (or the copy drill)."""
    spec = strings.task_spec(task)

    def batch(step: int) -> dict:
        words = [train_word(rng) for _ in range(batch_size)]
        return encode_examples([(spec.prompt(w), spec.answer(w)) for w in words])

    return batch


def other_prompt_batches(batch_size: int, rng: random.Random):
    """Prompts with made-up task names, answered as the base answers them: by copying.

    Adapters also train on these, so that each acts on its own task's prompts only and a merge of
    them keeps every task apart.
    """

    def batch(step: int) -> dict:
        pairs = []
        while len(pairs) < batch_size:
            name, word = strings.random_word(rng), train_word(rng)
            if name not in strings.TASKS:
                pairs.append((f"{name}: {word}\n", f"{word}\n"))
        return encode_examples(pairs)

    return batch


def build_base(folder: Path, text_steps: int, copy_steps: int, seed: int) -> None:
    """Pretrain on text, then on text and copy drills; save in bf16 (adapters train on the saved weights).

    A tiny byte LM does not learn to copy from plain text in minutes, and a rank-8 adapter cannot build
    the copying circuit itself; with it, each task is a small change of what is copied.
    """
    text = "\n\n".join(topics[key] for key in sorted(topics)).encode()
    generator = torch.Generator().manual_seed(seed)
    model = strings.new_base_model(seed)
    train(model, text_batches(text, 32, generator), text_steps, 3e-3, "base: text")
    text_batch = text_batches(text, 32, generator)
    copy_batch = task_batches(strings.COPY.name, 64, random.Random(f"{seed}:copy"))
    train(model, lambda step: [text_batch(step), copy_batch(step)], copy_steps, 1e-3, "base: text and copy drills")
    model.to(torch.bfloat16).save_pretrained(str(folder))


def build_adapter(base_folder: Path, task: str, folder: Path, steps: int, seed: int) -> None:
    model = strings.load_base_model(base_folder)  # named BASE_NAME, recorded as the adapters' base model
    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    own = task_batches(task, 64, random.Random(f"{seed}:{task}:train"))
    others = other_prompt_batches(32, random.Random(f"{seed}:{task}:others"))
    train(peft_model, lambda step: [own(step), others(step)], steps, ADAPTER_LR, f"adapter {task}")
    peft_model.save_pretrained(str(folder))
    make_reproducible(folder)


def evaluate(output: Path) -> dict:
    """Test-split exact match: base and each adapter on every task, and a TSV merge of all adapters."""
    evaluator = strings.StringsEvaluator(str(output / "base"))
    tasks = evaluator.tasks
    copy = strings.task_accuracy(evaluator.model, evaluator.tokenizer, strings.COPY.name, "test", evaluator.n)
    adapters = {task: str(output / "adapters" / task) for task in tasks}
    with tempfile.TemporaryDirectory() as scratch:
        merged = Path(scratch) / "merged"
        merge_to_folder(list(adapters.values()), MergeOptions.create(method="tsv"), merged)
        runs = {"base": None, **adapters, "merged": str(merged)}
        table = {run: {task: evaluator.accuracy(task, path, "test") for task in tasks}
                 for run, path in tqdm(runs.items(), desc="evaluate", unit="model")}
    return {
        "split": "test", "n": evaluator.n,
        "base": table["base"],
        "base_copy": copy,
        "adapters": {task: table[task][task] for task in tasks},
        "merged_tsv": table["merged"],
        "adapter_by_task": {task: table[task] for task in tasks},
        "quick": quick_check(output, tasks),
    }


def quick_check(output: Path, tasks: list[str]) -> dict:
    """The same figures on the first CHECK_SIZE test inputs only, which the fast tests reproduce."""
    evaluator = strings.StringsEvaluator(str(output / "base"), n=strings.CHECK_SIZE)
    return {
        "n": evaluator.n,
        "base": {task: evaluator.accuracy(task, None, "test") for task in tasks},
        "adapters": {task: evaluator.accuracy(task, str(output / "adapters" / task), "test") for task in tasks},
    }


def print_table(accuracy: dict) -> None:
    tasks = list(accuracy["base"])
    print(f"{'task':<10}{'base':>8}{'adapter':>9}{'tsv merge':>11}")
    for task in tasks:
        print(f"{task:<10}{accuracy['base'][task]:>8.3f}{accuracy['adapters'][task]:>9.3f}"
              f"{accuracy['merged_tsv'][task]:>11.3f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "presets" / "strings")
    parser.add_argument("--text-steps", type=int, default=500)
    parser.add_argument("--copy-steps", type=int, default=300)
    parser.add_argument("--adapter-steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is faster on a busy machine")
    parser.add_argument("--reuse-base", action="store_true",
                        help="keep the base already in --output (pretraining is most of the time); retrain the adapters")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    output = args.output
    if args.reuse_base:
        if not (output / "base" / "model.safetensors").is_file():
            raise SystemExit(f"--reuse-base: no base model in {output / 'base'}")
        shutil.rmtree(output / "adapters", ignore_errors=True)
    else:
        if output.exists() and any(output.iterdir()):
            if not (output / MANIFEST_NAME).exists():
                raise SystemExit(f"--output {output}: not empty and not a built preset; refusing to delete it")
            shutil.rmtree(output)
        build_base(output / "base", args.text_steps, args.copy_steps, args.seed)
    for task in strings.TASKS:
        steps = args.adapter_steps * STEPS_FACTOR.get(task, 1)
        build_adapter(output / "base", task, output / "adapters" / task, steps, args.seed)
    accuracy = evaluate(output)
    (output / "accuracy.json").write_text(json.dumps(accuracy, indent=1) + "\n")
    write_manifest(output)
    print_table(accuracy)
    print(f"built {output} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
