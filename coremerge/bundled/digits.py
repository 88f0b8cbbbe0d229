"""The bundled vision preset: eight tasks over scikit-learn's 8x8 digits on one tiny ViT.

The tasks differ in input domain (rotated, mirrored, inverted, noisy, plain, rotated by 180
degrees, transposed, flipped digits) and in label set (digit, closed loops, parity, "greater than 4"). As in
the paper, where each dataset's head is the frozen text embedding of its class names, each task
has its own frozen head: fixed class embeddings (`task_head`), so the base model is at chance
with it and the adapter has to move the backbone's features onto them. Only the backbone
adapters are merged; the heads stay per task.
"""

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import ViTConfig, ViTModel

from .switching import activate_adapter, forget_adapter

HEAD_NAME = "head.safetensors"
BASE_NAME = "coremerge/digits-vit"  # the base model name recorded in the adapters
SPLIT_SEED = 0
HEAD_SEED = 100
SPLITS = ("train", "validation", "test")


def _noise(x: np.ndarray) -> np.ndarray:
    return np.clip(x + np.random.default_rng(1).normal(0, 0.1, x.shape), 0, 1)




@dataclass(frozen=True)
class DigitsTask:
    name: str
    description: str
    transform: Callable[[np.ndarray], np.ndarray]  # (N, 8, 8) in [0, 1] -> same
    labels: tuple[str, ...]
    label_of: Callable[[np.ndarray], np.ndarray]  # digit -> class index


DIGIT_LABELS = tuple(str(d) for d in range(10))
LOOPS = np.array([1, 0, 0, 0, 1, 0, 1, 0, 2, 1])  # closed loops in each digit as commonly written


def _digit(y):
    return y


TASKS: dict[str, DigitsTask] = {t.name: t for t in (
    DigitsTask("rotate90", "digits rotated by 90 degrees", lambda x: np.rot90(x, 1, axes=(1, 2)), DIGIT_LABELS, _digit),
    DigitsTask("mirror", "mirrored digits", lambda x: x[:, :, ::-1], DIGIT_LABELS, _digit),
    DigitsTask("invert", "inverted digits (dark on light)", lambda x: 1 - x, DIGIT_LABELS, _digit),
    DigitsTask("noisy", "digits with Gaussian noise", _noise, DIGIT_LABELS, _digit),
    DigitsTask("loops", "plain digits, labelled by their number of closed loops", lambda x: x,
               ("no loop", "one loop", "two loops"), lambda y: LOOPS[y]),
    DigitsTask("parity", "digits rotated by 180 degrees, labelled even or odd", lambda x: x[:, ::-1, ::-1],
               ("even", "odd"), lambda y: y % 2),
    DigitsTask("greater4", "transposed digits, labelled 0-4 or 5-9", lambda x: np.swapaxes(x, 1, 2),
               ("0-4", "5-9"), lambda y: (y > 4).astype(np.int64)),
    DigitsTask("flipped", "digits flipped upside down", lambda x: x[:, ::-1], DIGIT_LABELS, _digit),
)}


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    from sklearn.datasets import load_digits  # ships its data with the package

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)  # (1797, 8, 8) in [0, 1]
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    n_train, n_val = int(0.6 * len(order)), int(0.2 * len(order))
    splits = {"train": order[:n_train], "validation": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return images, data.target.astype(np.int64), splits


def task_data(task: Optional[str], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 8, 8) and labels of a task's split; task None is plain digit recognition."""
    images, digits, splits = _digits()
    index = splits[split]
    x, y = images[index], digits[index]
    if task is not None:
        x, y = TASKS[task].transform(x), TASKS[task].label_of(y)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[:, None], torch.from_numpy(y)


def vit_config(hidden: int = 96) -> ViTConfig:
    return ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=hidden, num_hidden_layers=4,
                     num_attention_heads=4, intermediate_size=2 * hidden, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)


def features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The [CLS] embedding after the final layer norm: (N, hidden)."""
    return backbone(pixel_values=images).last_hidden_state[:, 0]


def new_head(task: Optional[str], hidden: int) -> nn.Linear:
    """A trainable head: 10 digit classes for plain digits (pretraining), else the task's labels."""
    return nn.Linear(hidden, len(TASKS[task].labels) if task else 10)


def task_head(task: str, hidden: int) -> nn.Linear:
    """The task's frozen head: orthonormal class embeddings, no bias.

    The analogue of the paper's frozen zero-shot heads (text embeddings of each dataset's class
    names): one fixed head per task that the base model knows nothing of. All tasks' class
    embeddings come from one seeded orthonormal basis, so no two heads read the same direction:
    the tasks meet, and conflict, inside the merged backbone, not in their heads.
    """
    sizes = {name: len(spec.labels) for name, spec in TASKS.items()}
    generator = torch.Generator().manual_seed(HEAD_SEED)
    basis, _ = torch.linalg.qr(torch.randn(hidden, sum(sizes.values()), generator=generator))
    start = sum(sizes[name] for name in list(TASKS)[:list(TASKS).index(task)])
    head = nn.Linear(hidden, sizes[task])
    with torch.no_grad():
        head.weight.copy_(basis[:, start:start + sizes[task]].T)  # (classes, hidden), orthonormal rows
        head.bias.zero_()
    head.requires_grad_(False)
    return head.eval()


def save_head(head: nn.Linear, folder: Path) -> None:
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
              Path(folder) / HEAD_NAME)


def load_head(folder: Path) -> nn.Linear:
    state = load_file(Path(folder) / HEAD_NAME)
    head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    return head.eval()


def load_backbone(folder: Path) -> ViTModel:
    model = ViTModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
    model.name_or_path = BASE_NAME
    return model


class DigitsEvaluator:
    """Accuracy of the base model, or of it with one adapter, on each task, with the task's own head.

    The base model is loaded once; adapters (individual or merged) are loaded onto it by path
    and switched with peft's `set_adapter`.
    """

    def __init__(self, base_folder: str, heads: dict[str, str]):
        self.base_folder = base_folder
        self.heads = {task: load_head(Path(folder)) for task, folder in heads.items()}
        self.tasks = list(self.heads)
        self.model = load_backbone(Path(base_folder))
        self.loaded: dict[str, str] = {}  # adapter folder -> peft adapter name

    @torch.no_grad()
    def logits(self, task: str, images: torch.Tensor, adapter: Optional[str] = None, scale: float = 1.0):
        if adapter is None:
            if not self.loaded:
                return self.heads[task](features(self.model, images))
            with self.model.disable_adapter():
                return self.heads[task](features(self.model, images))
        activate_adapter(self, adapter, scale)
        return self.heads[task](features(self.model, images))

    def accuracy(self, task: str, adapter: Optional[str] = None, split: str = "test", scale: float = 1.0) -> float:
        """Accuracy on a task's split; `scale` multiplies the adapter's update (alpha search)."""
        x, y = task_data(task, split)
        return float((self.logits(task, x, adapter, scale).argmax(-1) == y).double().mean())

    def predict(self, task: str, images: torch.Tensor, adapter: Optional[str] = None) -> list[str]:
        """Label names for images (N, 1, 8, 8) in [0, 1]."""
        return [TASKS[task].labels[i] for i in self.logits(task, images, adapter).argmax(-1).tolist()]

    def forget(self, adapter: str) -> None:
        forget_adapter(self, adapter)
