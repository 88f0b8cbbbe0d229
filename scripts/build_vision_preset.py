"""Rebuild the bundled vision preset (presets/digits) from scratch, seeded.

    python scripts/build_vision_preset.py [--output presets/digits]

1. Pretrain a tiny ViT on plain scikit-learn digits (10 classes).
2. Fine-tune one LoRA adapter (r=8 on the attention and MLP linears) plus its own head per task.
3. Record each model's test accuracy, write sample images and a sha256 manifest.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from tqdm.auto import tqdm

from coremerge.bundled.digits import (BASE_NAME, TASKS, features, load_backbone, load_head, new_head, save_head,
                                      task_data, vit_config)
from coremerge.presets import write_manifest
from transformers import ViTModel

LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"], lora_dropout=0.0)
SAMPLES_PER_TASK = 3
ADAPTER_EPOCHS, LORA_LR = 80, 2e-3


def train(parameters, backbone, head, task, epochs: int, lr: float, desc: str) -> None:
    x, y = task_data(task, "train")
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * ((len(x) + 63) // 64))
    generator = torch.Generator().manual_seed(0)
    backbone.train(), head.train()
    for _ in tqdm(range(epochs), desc=desc, unit="epoch", leave=False):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            loss = torch.nn.functional.cross_entropy(head(features(backbone, x[batch])), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    backbone.eval(), head.eval()


@torch.no_grad()
def accuracy(backbone, head, task, split="test") -> float:
    x, y = task_data(task, split)
    return float((head(features(backbone, x)).argmax(-1) == y).double().mean())


def pretrain(output: Path) -> None:
    torch.manual_seed(0)
    backbone, head = ViTModel(vit_config(), add_pooling_layer=False), torch.nn.Linear(64, 10)
    train([*backbone.parameters(), *head.parameters()], backbone, head, None, epochs=60, lr=3e-3, desc="pretrain")
    print(f"base: plain digits test accuracy {accuracy(backbone, head, None):.3f}")
    backbone.save_pretrained(str(output / "base"))


def finetune(output: Path, task: str) -> None:
    """The task's LoRA adapter and its own head, trained together (the head stays task-specific)."""
    torch.manual_seed(1 + list(TASKS).index(task))
    model = get_peft_model(load_backbone(output / "base"), LoraConfig(**LORA))
    head = new_head(task, 64)
    parameters = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    train(parameters, model, head, task, epochs=ADAPTER_EPOCHS, lr=LORA_LR, desc=task)
    folder = output / "adapters" / task
    model.save_pretrained(str(folder))
    save_head(head, folder)


def write_samples(output: Path) -> list[dict]:
    samples = []
    for task_name, task in TASKS.items():
        x, y = task_data(task_name, "test")
        for i in range(SAMPLES_PER_TASK):
            path = Path("samples") / f"{task_name}-{i}.png"
            (output / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((x[i, 0].numpy() * 255).round().astype(np.uint8), mode="L").save(output / path)
            samples.append({"path": f"digits/{path}", "task": task_name, "label": task.labels[int(y[i])]})
    return samples


def main() -> None:
    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and avoids oversubscribing shared cores
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent.parent / "presets" / "digits")
    args = parser.parse_args()
    started = time.perf_counter()
    args.output.mkdir(parents=True, exist_ok=True)
    pretrain(args.output)
    for task in tqdm(TASKS, desc="adapters", unit="task"):
        finetune(args.output, task)
    base = load_backbone(args.output / "base")
    table = {"base": {}, "adapters": {}}
    from peft import PeftModel

    for task in TASKS:
        folder = args.output / "adapters" / task
        head = load_head(folder)
        table["base"][task] = accuracy(base, head, task)
        adapted = PeftModel.from_pretrained(load_backbone(args.output / "base"), str(folder)).eval()
        table["adapters"][task] = accuracy(adapted, head, task)
        print(f"{task:>10}: base {table['base'][task]:.3f}  adapter {table['adapters'][task]:.3f}")
    (args.output / "accuracy.json").write_text(json.dumps(table, indent=1) + "\n")
    (args.output / "samples.json").write_text(json.dumps(write_samples(args.output), indent=1) + "\n")
    write_manifest(args.output)
    print(f"rebuilt {args.output} in {time.perf_counter() - started:.0f} s (base model name {BASE_NAME})")


if __name__ == "__main__":
    main()
