"""Rebuild the bundled vision preset (presets/digits) from scratch, seeded.

    python scripts/build_vision_preset.py [--output presets/digits] [--threads 1]

1. Pretrain a small ViT broadly: digit recognition on plain digits and on each task's input domain
   (train split), one throw-away digit head per domain, so the backbone's features are general.
2. Fine-tune one LoRA adapter per task (r=8 on the attention and MLP linears) against the task's
   frozen head (`task_head`: fixed class embeddings the base model has never seen, orthogonal to
   every other task's).
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
                                      task_data, task_head, vit_config)
from coremerge.bundled.reproducible import make_reproducible
from coremerge.presets import write_manifest
from transformers import ViTModel

LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"], lora_dropout=0.0)
SAMPLES_PER_TASK = 3
HIDDEN = 96
PRETRAIN_EPOCHS, PRETRAIN_LR = 80, 3e-3
ADAPTER_EPOCHS, LORA_LR = 45, 2e-3
BATCH = 64


def train(parameters, backbone, head, task, epochs: int, lr: float, desc: str) -> None:
    x, y = task_data(task, "train")
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * -(-len(x) // BATCH))
    generator = torch.Generator().manual_seed(0)
    backbone.train()
    for _ in tqdm(range(epochs), desc=desc, unit="epoch", leave=False):
        for batch in torch.randperm(len(x), generator=generator).split(BATCH):
            loss = torch.nn.functional.cross_entropy(head(features(backbone, x[batch])), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    backbone.eval()


@torch.no_grad()
def accuracy(backbone, head, task, split="test") -> float:
    x, y = task_data(task, split)
    return float((head(features(backbone, x)).argmax(-1) == y).double().mean())


def pretrain(output: Path) -> None:
    """Digit recognition in every domain (plain digits and each task's inputs), one head per domain.

    Each epoch shows every training image once, in a domain drawn at random; the heads are thrown
    away, only the backbone is kept.
    """
    torch.manual_seed(0)
    domains = [None, *TASKS]
    backbone = ViTModel(vit_config(HIDDEN), add_pooling_layer=False)
    heads = torch.nn.ModuleList(new_head(None, HIDDEN) for _ in domains)
    images = torch.stack([task_data(domain, "train")[0] for domain in domains])  # (domains, N, 1, 8, 8)
    _, digits = task_data(None, "train")
    optimizer = torch.optim.AdamW([*backbone.parameters(), *heads.parameters()], lr=PRETRAIN_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=PRETRAIN_LR,
                                                   total_steps=PRETRAIN_EPOCHS * -(-len(digits) // BATCH))
    generator = torch.Generator().manual_seed(0)
    backbone.train()
    for _ in tqdm(range(PRETRAIN_EPOCHS), desc="pretrain", unit="epoch", leave=False):
        domain = torch.randint(len(domains), (len(digits),), generator=generator)
        for batch in torch.randperm(len(digits), generator=generator).split(BATCH):
            embedded = features(backbone, images[domain[batch], batch])
            logits = torch.stack([head(embedded) for head in heads])[domain[batch], torch.arange(len(batch))]
            loss = torch.nn.functional.cross_entropy(logits, digits[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    backbone.eval()
    _, test_digits = task_data(None, "test")
    for domain, head in zip(domains, heads):
        x, _ = task_data(domain, "test")
        with torch.no_grad():
            score = float((head(features(backbone, x)).argmax(-1) == test_digits).double().mean())
        print(f"base: digit accuracy on {domain or 'plain'} digits (its pretraining head) {score:.3f}")
    backbone.save_pretrained(str(output / "base"))


def finetune(output: Path, task: str) -> None:
    """The task's LoRA adapter, trained against the task's frozen head (saved beside it)."""
    torch.manual_seed(1 + list(TASKS).index(task))
    model = get_peft_model(load_backbone(output / "base"), LoraConfig(**LORA))
    head = task_head(task, HIDDEN)
    parameters = [p for p in model.parameters() if p.requires_grad]
    train(parameters, model, head, task, epochs=ADAPTER_EPOCHS, lr=LORA_LR, desc=task)
    folder = output / "adapters" / task
    model.save_pretrained(str(folder))
    make_reproducible(folder)
    save_head(head, folder)


def write_samples(output: Path) -> list[dict]:
    """A few test images per task, other digits for each task (the preset file lists the same ones)."""
    samples = []
    for number, (task_name, task) in enumerate(TASKS.items()):
        x, y = task_data(task_name, "test")
        for i in range(SAMPLES_PER_TASK):
            image = SAMPLES_PER_TASK * number + i
            path = Path("samples") / f"{task_name}-{i}.png"
            (output / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((x[image, 0].numpy() * 255).round().astype(np.uint8), mode="L").save(output / path)
            samples.append({"path": f"digits/{path}", "task": task_name, "label": task.labels[int(y[image])]})
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent.parent / "presets" / "digits")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a tiny model: one is as fast)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
