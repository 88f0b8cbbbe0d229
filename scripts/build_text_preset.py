"""Rebuild the bundled text preset (presets/strings/) from scratch, seeded, offline, on CPU.

1. Pretrain a tiny byte-level Llama on Python's own documentation text (pydoc_data.topics) as a plain LM.
2. Train one LoRA adapter (r=8, attention and MLP linears) per string task of coremerge.bundled.strings.
3. Evaluate the base and every adapter on every task's test split; write accuracy.json and the manifest.

The base is named coremerge/strings-base (not its folder) before peft sees it, so that the adapters'
base_model_name_or_path does not depend on where the preset was built.

    python scripts/build_text_preset.py [--output presets/strings]
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
from coremerge.presets import write_manifest

ROOT = Path(__file__).resolve().parent.parent
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, batches, steps: int, peak_lr: float, description: str) -> None:
    """AdamW on the model's trainable parameters; `batches(step)` gives the forward's keyword arguments."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=peak_lr, weight_decay=0.0)
    model.train()
    bar = tqdm(range(steps), desc=description, unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr, warmup=max(1, steps // 20))
        loss = model(**batches(step)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def text_batches(text: bytes, batch_size: int, generator: torch.Generator):
    """Random windows of the text as byte ids (the tokenizer's: byte + 3).

    In half of the windows a span of 8 to 40 bytes is said twice before the text goes on: a tiny LM
    on plain text learns to copy only after far more steps than we spend, and the string tasks build on copying.
    """
    ids = torch.tensor(list(text), dtype=torch.long) + 3
    length = strings.MAX_POSITIONS

    def window(start: int, repeat: int) -> torch.Tensor:
        if repeat == 0:
            return ids[start:start + length]
        span = ids[start:start + repeat]
        return torch.cat([span, span, ids[start + repeat:start + length - repeat]])

    def batch(step: int) -> dict:
        starts = torch.randint(0, len(ids) - length, (batch_size,), generator=generator).tolist()
        repeats = torch.randint(8, 41, (batch_size,), generator=generator) * (torch.arange(batch_size) % 2)
        windows = torch.stack([window(s, r) for s, r in zip(starts, repeats.tolist())])
        return {"input_ids": windows, "labels": windows}

    return batch


def task_batches(task: str, batch_size: int, rng: random.Random):
    """Random training inputs of one task: loss on the answer only, padded on the right."""
    tok = strings.tokenizer()
    spec = strings.TASKS[task]

    def batch(step: int) -> dict:
        words = []
        while len(words) < batch_size:
            word = strings.random_word(rng)
            if strings.split_of(word) == "train":
                words.append(word)
        prompts = [tok.encode(spec.prompt(w), add_special_tokens=False) for w in words]
        answers = [tok.encode(spec.answer(w), add_special_tokens=False) for w in words]
        width = max(len(p) + len(a) for p, a in zip(prompts, answers))
        input_ids = torch.full((batch_size, width), tok.pad_token_id)
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, (p, a) in enumerate(zip(prompts, answers)):
            input_ids[row, :len(p) + len(a)] = torch.tensor(p + a)
            labels[row, len(p):len(p) + len(a)] = torch.tensor(a)
            mask[row, :len(p) + len(a)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    return batch


def build_base(folder: Path, steps: int, seed: int) -> None:
    """Pretrain and save in bf16 (adapters are trained on the saved, rounded weights)."""
    text = "\n\n".join(topics[key] for key in sorted(topics)).encode()
    model = strings.new_base_model(seed)
    train(model, text_batches(text, 32, torch.Generator().manual_seed(seed)), steps, 3e-3, "pretrain base")
    model.to(torch.bfloat16).save_pretrained(str(folder))


def build_adapter(base_folder: Path, task: str, folder: Path, steps: int, seed: int) -> None:
    model = strings.load_base_model(base_folder)  # named BASE_NAME, recorded as the adapters' base model
    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    rng = random.Random(f"{seed}:{task}:train")
    train(peft_model, task_batches(task, 64, rng), steps, 5e-3, f"adapter {task}")
    peft_model.save_pretrained(str(folder))


def evaluate(output: Path) -> dict:
    """Test-split exact match: base and each adapter on every task, and a TSV merge of all adapters."""
    evaluator = strings.Evaluator(output / "base")
    tasks = evaluator.tasks
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
        "adapters": {task: table[task][task] for task in tasks},
        "merged_tsv": table["merged"],
        "adapter_by_task": {task: table[task] for task in tasks},
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
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--adapter-steps", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is faster on a busy machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    output = args.output
    if output.exists():
        shutil.rmtree(output)
    build_base(output / "base", args.pretrain_steps, args.seed)
    for task in strings.TASKS:
        build_adapter(output / "base", task, output / "adapters" / task, args.adapter_steps, args.seed)
    accuracy = evaluate(output)
    (output / "accuracy.json").write_text(json.dumps(accuracy, indent=1) + "\n")
    write_manifest(output)
    print_table(accuracy)
    print(f"built {output} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
