"""The text preset's world: a byte tokenizer, a tiny Llama, string tasks, greedy generation and accuracy.

Used by scripts/build_text_preset.py (training), the evaluation, the tests and the app. The base model is
pretrained on Python's own documentation text and on copy drills (`copy: abc\\n` -> `abc\\n`); each task
(`upper: abc\\n` -> `ABC\\n`, ...) is learnt by one rank-8 LoRA adapter.
"""

import hashlib
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from transformers import ByT5Tokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from .switching import forget_adapter, run_with_adapter

BASE_NAME = "coremerge/strings-base"  # the base's name_or_path, recorded in every adapter (not a Hub repo)
MAX_POSITIONS = 96
MIN_LENGTH, MAX_LENGTH = 3, 8  # task input lengths
SPLITS = ("train", "validation", "test")
EVAL_SIZE = 100  # inputs per task and split, in recorded accuracies and the benchmark
CHECK_SIZE = 20  # inputs per task in the quick figures that the tests reproduce


def tokenizer() -> ByT5Tokenizer:
    """Bytes as tokens (id = byte + 3; pad 0, eos 1, unk 2): needs no files, so it works offline."""
    return ByT5Tokenizer(extra_ids=0)


NEWLINE_ID = tokenizer().convert_tokens_to_ids("\n")


def new_base_model(seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised causal LM of about 0.8 M parameters over the byte vocabulary."""
    tok = tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=344, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.name_or_path = BASE_NAME
    model.generation_config = GenerationConfig(
        do_sample=False, eos_token_id=[NEWLINE_ID, tok.eos_token_id], pad_token_id=tok.pad_token_id,
    )
    return model


def load_base_model(folder: Path) -> LlamaForCausalLM:
    """The saved base in float32 (it is stored in bf16), named BASE_NAME so that adapters made on it are portable."""
    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    model.name_or_path = BASE_NAME
    return model


# Tasks


@dataclass(frozen=True)
class Task:
    name: str
    solve: Callable[[str], str]

    def prompt(self, word: str) -> str:
        return f"{self.name}: {word}\n"

    def answer(self, word: str) -> str:
        return self.solve(word) + "\n"


def _caesar(word: str) -> str:
    """Each letter shifted by one: abz -> bca."""
    return "".join(chr((ord(c) - ord("a") + 1) % 26 + ord("a")) for c in word)


def _atbash(word: str) -> str:
    """The alphabet mirrored: abz -> zya."""
    return "".join(chr(ord("z") - ord(c) + ord("a")) for c in word)


def _double(word: str) -> str:
    """Each letter twice: abz -> aabbzz."""
    return "".join(c + c for c in word)


TASKS = {task.name: task for task in (
    Task("upper", str.upper),
    Task("caesar", _caesar),
    Task("double", _double),
    Task("atbash", _atbash),
)}
COPY = Task("copy", lambda word: word)  # taught to the base in pretraining; no adapter needed


def task_spec(name: str) -> Task:
    """A task of TASKS, or the copy drill."""
    return COPY if name == COPY.name else TASKS[name]


def split_of(word: str) -> str:
    """A fixed split per input string (by its hash), so that test inputs are never trained on, for any task."""
    bucket = hashlib.sha256(word.encode()).digest()[0] % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def random_word(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(MIN_LENGTH, MAX_LENGTH)))


def task_words(task: str, split: str, n: int, seed: int = 0) -> list[str]:
    """`n` distinct inputs of one split, the same for the same task, split, n and seed."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
    rng = random.Random(f"{seed}:{task}:{split}")
    words: dict[str, None] = {}
    while len(words) < n:
        word = random_word(rng)
        if split_of(word) == split:
            words[word] = None
    return list(words)


def task_examples(task: str, split: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, expected answer) pairs; the answer ends with a newline."""
    spec = task_spec(task)
    return [(spec.prompt(word), spec.answer(word)) for word in task_words(task, split, n, seed)]


# Generation and accuracy


@torch.no_grad()
def generate(model, tok: ByT5Tokenizer, prompts: Sequence[str], max_new_tokens: int = 2 * MAX_LENGTH + 2) -> list[str]:
    """Greedy continuations of a batch of prompts, each cut after its first line."""
    batch = tok(list(prompts), add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    output = model.generate(
        **batch, max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=[NEWLINE_ID, tok.eos_token_id], pad_token_id=tok.pad_token_id,
    )
    texts = tok.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [text.split("\n")[0] for text in texts]


def task_accuracy(model, tok: ByT5Tokenizer, task: str, split: str = "test", n: int = EVAL_SIZE) -> float:
    """Exact match of the greedy answers on `n` inputs of one task's split."""
    examples = task_examples(task, split, n)
    answers = generate(model, tok, [prompt for prompt, _ in examples])
    return exact_match(answers, [expected for _, expected in examples])


def exact_match(answers: Sequence[str], expected: Sequence[str]) -> float:
    """Fraction of answers (first lines) equal to the expected ones (which end with a newline)."""
    if len(answers) != len(expected) or not answers:
        raise ValueError(f"exact_match: {len(answers)} answers for {len(expected)} expected ones")
    return sum(got == want.rstrip("\n") for got, want in zip(answers, expected)) / len(answers)


class StringsEvaluator:
    """Exact match of the base model, or of it with one adapter, on each task.

    The base model is loaded once; adapters (individual or merged) are loaded onto it by path
    and switched with peft's `set_adapter`.
    """

    def __init__(self, base_folder: str, tasks: Optional[Sequence[str]] = None, n: int = EVAL_SIZE):
        unknown = [task for task in tasks or () if task not in TASKS]
        if unknown:
            raise ValueError(f"tasks {unknown}: choose among {', '.join(TASKS)}")
        self.tokenizer = tokenizer()
        self.model = load_base_model(Path(base_folder))
        self.loaded: dict[str, str] = {}  # adapter folder -> peft adapter name
        self.tasks = list(tasks or TASKS)
        self.n = n

    def accuracy(self, task: str, adapter: Optional[str] = None, split: str = "test", scale: float = 1.0) -> float:
        """Exact match on `n` inputs of a task's split; `scale` multiplies the adapter's update (alpha search)."""
        if task not in TASKS:
            raise ValueError(f"task {task!r}: choose one of {', '.join(TASKS)}")
        return run_with_adapter(self, adapter, scale,
                                lambda model: task_accuracy(model, self.tokenizer, task, split, self.n))

    def generate(self, prompts: Sequence[str], adapter: Optional[str] = None) -> list[str]:
        """Greedy answers (first line) to prompts such as `upper: abc\\n` (the newline is added if missing)."""
        prompts = [prompt if prompt.endswith("\n") else prompt + "\n" for prompt in prompts]
        return run_with_adapter(self, adapter, 1.0, lambda model: generate(model, self.tokenizer, prompts))

    @staticmethod
    def expected(prompt: str) -> Optional[str]:
        """The right answer to `task: word` (a task of TASKS or `copy`, a lowercase word), else None."""
        task, _, word = prompt.rstrip("\n").partition(": ")
        if (task in TASKS or task == COPY.name) and word and set(word) <= set(string.ascii_lowercase):
            return task_spec(task).solve(word)
        return None

    @classmethod
    def task_of(cls, prompt: str) -> Optional[str]:
        """The task a prompt belongs to (`upper: banana` -> `upper`), for the cross-task table; else None."""
        return prompt.partition(": ")[0] if cls.expected(prompt) is not None else None

    def forget(self, adapter: str) -> None:
        forget_adapter(self, adapter)
