"""The KnOTS ViT-B/32 side by side's own work, on CPU, with a CLIP of ViT-B/32's shape (random weights, no Hub):

    python benchmarks/bench_clip_heads.py [--threads 2]

1. zero-shot heads (each class name in each of the task's templates through the text encoder) of the four small
   tasks (EuroSAT, GTSRB, MNIST, SVHN), and the time per prompt times the eight tasks' prompt count: what the
   heads would cost on this CPU (the app builds them on the comparison device, once, and keeps them on disk);
2. one side by side's image encoder work: 16 images (two per task) x 10 variants (base, 8 LoRAs, merge), without
   the LoRA switching.
The tokenizer is a byte-level one (a token per character) truncated at 20 tokens, about the length of these
prompts in CLIP's BPE tokens.
"""

import argparse
import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

from coremerge.comparison.clip_zero_shot import TEMPLATES, zero_shot_head

CLASSES = {"stanford_cars": 196, "dtd": 47, "eurosat": 10, "gtsrb": 43, "mnist": 10, "resisc45": 45, "sun397": 397,
           "svhn": 10}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE({"<pad>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = CLIPModel(CLIPConfig()).eval()  # the defaults are ViT-B/32's sizes
    tokenizer = byte_tokenizer()
    tokenizer.model_max_length = 20
    model.config.text_config.max_position_embeddings = 20  # zero_shot_head truncates there
    started = time.perf_counter()
    prompts = 0
    for task in ("eurosat", "gtsrb", "mnist", "svhn"):
        zero_shot_head(model, tokenizer, [f"{task} class number {i}" for i in range(CLASSES[task])], TEMPLATES[task])
        prompts += CLASSES[task] * len(TEMPLATES[task])
    heads = time.perf_counter() - started
    every = sum(count * len(TEMPLATES[task]) for task, count in CLASSES.items())
    pixels = torch.randn(16, 3, 224, 224)
    started = time.perf_counter()
    with torch.no_grad():
        for _ in range(10):
            model.get_image_features(pixel_values=pixels)
    images = time.perf_counter() - started
    print(f"heads: {prompts} prompts in {heads:.1f} s ({args.threads} threads); the eight tasks' {every} prompts "
          f"would take {heads / prompts * every:.0f} s")
    print(f"image encoder: 16 images x 10 variants in {images:.1f} s")


if __name__ == "__main__":
    main()
