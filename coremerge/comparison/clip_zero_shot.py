"""Zero-shot CLIP classification for the KnOTS-style vision presets: one text head per task, LoRA on the image
encoder.

A task's head is CLIP's zero-shot classifier (Radford et al. 2021) as Task Arithmetic and KnOTS build it: every
class name is put into each of the task's prompt templates, the base model's text tower embeds the prompts, the
normalized embeddings are averaged per class and normalized again (gstoica27/KnOTS,
dataset/parsing/generate_clip_heads.py build_classification_head). An image goes to the class whose head is most
similar to its normalized image embedding. The adapters (and the merge) change only the image encoder, so the heads
are built once, with the base model, and shared by every column of the side by side.
"""

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..bundled.switching import forget_adapter, run_with_adapter
from ..errors import CoreMergeError
from ..presets import SampleDataset
from .hub_images import class_names, read_images, split_shard
from .runners import comparison_device, inference_dtype
from .side_by_side import ClassificationComparison, LabelledImage, Variant

SAMPLES_PER_TASK = 2  # test images per task in the side by side

# The prompt templates of the eight-task benchmark, as gstoica27/KnOTS dataset/templates.py gives them (the same
# as mlfoundations/task_vectors src/datasets/templates.py, from OpenAI's CLIP prompt-engineering notebook).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "stanford_cars": ("a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!",
                      "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.",
                      "a photo of my old {}."),
    "dtd": ("a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} thing.",
            "a photo of a {} object.", "a photo of the {} texture.", "a photo of the {} pattern.",
            "a photo of the {} thing.", "a photo of the {} object."),
    "eurosat": ("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                "a centered satellite photo of the {}."),
    "gtsrb": ('a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.',
              'a close up photo of a "{}" traffic sign.'),
    "mnist": ('a photo of the number: "{}".',),
    "resisc45": tuple(f"{view} {kind} of {article}{{}}." for article in ("", "a ", "the ")
                      for kind in ("imagery", "photo", "view") for view in ("satellite", "aerial")),
    "sun397": ("a photo of a {}.", "a photo of the {}."),
    "svhn": ('a photo of the number: "{}".',),
}
# resisc45's 18, in KnOTS's order: "satellite imagery of {}.", "aerial imagery of {}.", "satellite photo of {}.",
# ... "aerial view of the {}." (view alternates fastest, then kind, then article).

DIGITS = tuple(str(d) for d in range(10))
# Class names where the paper's differ from the dataset's label names, by label index. EuroSAT: KnOTS
# dataset/eurosat.py maps the folder names (alphabetical) to OpenAI's names; GTSRB: KnOTS dataset/gtsrb.py
# class_names (from task_vectors); MNIST and SVHN: the digits. Elsewhere the dataset's own class names, with
# underscores as spaces (KnOTS reads them from the class folders the same way).
PAPER_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "eurosat": ("annual crop land", "forest", "brushland or shrubland", "highway or road",
                "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
                "residential buildings or homes or apartments", "river", "lake or sea"),
    "gtsrb": (
        "red and white circle 20 kph speed limit", "red and white circle 30 kph speed limit",
        "red and white circle 50 kph speed limit", "red and white circle 60 kph speed limit",
        "red and white circle 70 kph speed limit", "red and white circle 80 kph speed limit",
        "end / de-restriction of 80 kph speed limit", "red and white circle 100 kph speed limit",
        "red and white circle 120 kph speed limit", "red and white circle red car and black car no passing",
        "red and white circle red truck and black car no passing", "red and white triangle road intersection warning",
        "white and yellow diamond priority road", "red and white upside down triangle yield right-of-way", "stop",
        "empty red and white circle", "red and white circle no truck entry",
        "red circle with white horizonal stripe no entry", "red and white triangle with exclamation mark warning",
        "red and white triangle with black left curve approaching warning",
        "red and white triangle with black right curve approaching warning",
        "red and white triangle with black double curve approaching warning",
        "red and white triangle rough / bumpy road warning", "red and white triangle car skidding / slipping warning",
        "red and white triangle with merging / narrow lanes warning",
        "red and white triangle with person digging / construction / road work warning",
        "red and white triangle with traffic light approaching warning",
        "red and white triangle with person walking warning",
        "red and white triangle with child and person walking warning", "red and white triangle with bicyle warning",
        "red and white triangle with snowflake / ice warning", "red and white triangle with deer warning",
        "white circle with gray strike bar no speed limit", "blue circle with white right turn arrow mandatory",
        "blue circle with white left turn arrow mandatory", "blue circle with white forward arrow mandatory",
        "blue circle with white forward or right turn arrow mandatory",
        "blue circle with white forward or left turn arrow mandatory",
        "blue circle with white keep right arrow mandatory", "blue circle with white keep left arrow mandatory",
        "blue circle with white arrows indicating a traffic circle",
        "white circle with gray strike bar indicating no passing for cars has ended",
        "white circle with gray strike bar indicating no passing for trucks has ended"),
    "mnist": DIGITS,
    "svhn": DIGITS,
}


def task_class_names(task: str, dataset_names: Sequence[str], source: str) -> list[str]:
    """The class names the task's head is built from, by label index."""
    paper = PAPER_CLASS_NAMES.get(task)
    if paper is None:
        return [name.replace("_", " ") for name in dataset_names]
    if dataset_names and len(dataset_names) != len(paper):
        raise CoreMergeError(f"dataset {source}: {len(dataset_names)} classes, but task {task} has {len(paper)}")
    return list(paper)


def templates_for(task: str) -> tuple[str, ...]:
    if task not in TEMPLATES:
        raise CoreMergeError(f"task {task}: no zero-shot prompt templates; known tasks: {', '.join(TEMPLATES)}")
    return TEMPLATES[task]


@torch.no_grad()
def zero_shot_head(model, tokenizer, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(classes, dim): per class, the mean of its normalized prompt embeddings, normalized."""
    rows = []
    for name in names:
        tokens = tokenizer([t.format(name) for t in templates], return_tensors="pt", padding=True,
                           truncation=True, max_length=model.config.text_config.max_position_embeddings)
        tokens = tokens.to(model.device)
        embeddings = model.get_text_features(**tokens).pooler_output.float()
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        mean = embeddings.mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


class ClipZeroShotRunner:
    """CLIP (base model) with a zero-shot head per task and a few test images per task from the Hub datasets.

    The images are fetched (Hub cache), preprocessed and kept as pixel tensors at construction, in the calling
    process. The heads (thousands of prompts through the text encoder: minutes on a small CPU, a few seconds on a
    GPU) are built on the comparison device on first use, in the GPU function, and written to the runner's folder,
    where the next ZeroGPU worker (a new fork each call) finds them. Adapters are switched on the image encoder
    (`model.vision_model`) with peft.
    """

    def __init__(self, base_model: str, datasets: Sequence[SampleDataset], per_task: int = SAMPLES_PER_TASK):
        from transformers import AutoProcessor, CLIPModel

        if not datasets:
            raise CoreMergeError("zero-shot classification needs the preset's sample datasets; none given")
        processor = AutoProcessor.from_pretrained(base_model)
        if processor.tokenizer.pad_token is None:
            processor.tokenizer.pad_token = processor.tokenizer.eos_token
        clip = CLIPModel.from_pretrained(base_model, dtype=torch.float32).eval()
        self.folder = Path(tempfile.mkdtemp(prefix="coremerge-samples-"))
        weakref.finalize(self, shutil.rmtree, str(self.folder), True)
        self.tokenizer = processor.tokenizer
        self.images: list[LabelledImage] = []
        self.heads: dict[str, torch.Tensor] = {}
        self.pixels: dict[str, torch.Tensor] = {}
        self.classes: dict[str, list[str]] = {}
        for source in datasets:
            templates_for(source.task)  # an unknown task fails here, before any GPU time
            shard = split_shard(source.source, source.split, source.subset)
            names = task_class_names(source.task, class_names(shard), source.source)
            self.classes[source.task] = names
            samples = read_images(shard, per_task)
            self.pixels[source.task] = processor.image_processor(
                [s.image for s in samples], return_tensors="pt")["pixel_values"]
            for number, sample in enumerate(samples):
                path = self.folder / f"{source.task}-{number}.png"
                sample.image.save(path)
                self.images.append(LabelledImage(str(path), source.task, names[sample.label]))
        self.device = comparison_device()
        self.dtype = inference_dtype(self.device)
        self.clip = clip.to(self.device, self.dtype)
        self.model = self.clip.vision_model  # what adapters are loaded onto (wrapped in a PeftModel then)
        self.loaded: dict[str, str] = {}
        self.remembered: dict[tuple[str, Optional[str]], list[str]] = {}

    def head(self, task: str) -> torch.Tensor:
        """The task's zero-shot head: kept in this process, else read from the runner's folder, else built."""
        if task not in self.heads:
            saved = self.folder / f"head-{task}.pt"
            if saved.is_file():
                head = torch.load(saved, map_location="cpu")
            else:
                head = zero_shot_head(self.clip, self.tokenizer, self.classes[task], templates_for(task)).cpu()
                partial = saved.with_suffix(".partial")
                torch.save(head, partial)
                partial.replace(saved)  # whole or absent, for a worker that reads it meanwhile
            self.heads[task] = head.to(self.device)
        return self.heads[task]

    @torch.no_grad()
    def predict(self, task: str, adapter: Optional[str] = None) -> list[str]:
        """The class of each of the task's sample images, with the image encoder of `adapter` (None: the base)."""
        pixels = self.pixels[task].to(self.device, self.dtype)

        def embed(_):  # the LoRA layers sit inside clip.vision_model, where peft put them
            return self.clip.get_image_features(pixel_values=pixels).pooler_output.float()

        features = run_with_adapter(self, adapter, 1.0, embed)
        features = features / features.norm(dim=-1, keepdim=True)
        # (The logit scale of CLIP multiplies every score alike: the argmax does not need it.)
        best = (features @ self.head(task).T).argmax(dim=-1)
        return [self.classes[task][i] for i in best.tolist()]

    def column(self, adapter: Optional[str], remember: bool) -> list[str]:
        """One variant's label for every sample image, task by task (in the order of `images`)."""
        labels = []
        for task in self.pixels:
            key = (task, adapter)
            if remember and key in self.remembered:
                labels += self.remembered[key]
                continue
            predicted = self.predict(task, adapter)
            if remember:
                self.remembered[key] = predicted
            labels += predicted
        return labels

    def forget(self, adapter: str) -> None:
        forget_adapter(self, adapter)


def compare_zero_shot(runner: ClipZeroShotRunner, variants: Sequence[Variant],
                      progress: Callable[[str], None] = lambda stage: None) -> ClassificationComparison:
    """Every variant's class for every sample image, with the image's task head; `variants[-1]` is the merge.
    The base's and the individual adapters' columns are kept for the next merge (the merge's folder is new)."""
    merged = variants[-1].adapter
    try:
        columns = []
        for variant in variants:
            progress(f"classifying the samples: {variant.name}")
            columns.append(runner.column(variant.adapter, remember=variant.adapter != merged))
    finally:
        runner.forget(merged)
    return ClassificationComparison([v.name for v in variants], list(runner.images),
                                    [list(row) for row in zip(*columns)], [])
