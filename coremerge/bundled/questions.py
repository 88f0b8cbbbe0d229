"""The questions preset's world: four questions over four input domains, one label space, exact match.

Each task asks one question about a short string of its own alphabet (`even? 4821` about digits,
`ends in a vowel? banana` about lowercase words, `has a Q? KIWQI` about capitals, `has a star? +*=-`
about symbols) and is answered `yes` or `no`: one behaviour and one label space, as in the paper's NLI
tasks, over inputs that do not overlap. The base is the tiny byte-level Llama of `coremerge.bundled.strings`,
pretrained on Python's documentation text only; scripts/build_questions_preset.py trains one adapter per task.
"""

import hashlib
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from . import strings
from .switching import forget_adapter, run_with_adapter

BASE_NAME = "coremerge/questions-base"  # the base's name_or_path, recorded in every adapter (not a Hub repo)
SPLITS = ("train", "validation", "test")
EVAL_SIZE = 100  # inputs per task and split in the recorded accuracies, the test file and the benchmark
CHECK_SIZE = 20  # inputs per task in the quick figures that the tests reproduce
MAX_NEW_TOKENS = 5  # `yes` or `no` and the newline fit
LABELS = ("yes", "no")


@dataclass(frozen=True)
class Task:
    name: str
    question: str
    alphabet: str
    lengths: tuple[int, int]
    holds: Callable[[str], bool]  # the answer is `yes` when this holds
    needle: str = ""  # for "has a ...?" questions: the character searched for

    def prompt(self, text: str) -> str:
        return f"{self.question} {text}\n"

    def answer(self, text: str) -> str:
        return "yes" if self.holds(text) else "no"

    def draw(self, rng: random.Random, label: bool) -> str:
        """A random input whose answer is `label` (labels are drawn balanced)."""
        while True:
            text = "".join(rng.choices(self.alphabet, k=rng.randint(*self.lengths)))
            if self.needle and label:  # the searched character at a random place: half the inputs have it
                i = rng.randrange(len(text))
                text = text[:i] + self.needle + text[i + 1:]
            if self.holds(text) == label:
                return text


TASKS = {task.name: task for task in (
    Task("even", "even?", string.digits, (2, 6), lambda s: int(s[-1]) % 2 == 0),
    Task("vowel", "ends in a vowel?", string.ascii_lowercase, (3, 8), lambda s: s[-1] in "aeiou"),
    Task("hasq", "has a Q?", string.ascii_uppercase, (3, 8), lambda s: "Q" in s, needle="Q"),
    Task("star", "has a star?", "+-/=<>%&", (3, 8), lambda s: "*" in s, needle="*"),
)}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what a byte-level BPE vocabulary is made of)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def tokenizer() -> PreTrainedTokenizerFast:
    """Bytes as tokens with the ids of `strings.tokenizer()` (byte + 3; pad 0, eos 1, unk 2), as a fast
    tokenizer that adds no special tokens, so that a plain `tokenizer(prompt)` gives exactly the prompt's
    bytes (ByT5's tokenizer appends an end-of-sequence token the model never saw after a prompt)."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{char: byte + 3 for byte, char in _bytes_to_unicode().items()}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


TOKENIZER = tokenizer()


def split_of(text: str) -> str:
    """A fixed split per input (by its hash), so that test inputs are never trained on."""
    bucket = hashlib.sha256(text.encode()).digest()[0] % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def examples(task: str, split: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n` distinct (prompt, answer) pairs of one task's split, half `yes`, the same for the same arguments."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
    if task not in TASKS:
        raise ValueError(f"task {task!r}: choose one of {', '.join(TASKS)}")
    spec, rng, chosen = TASKS[task], random.Random(f"{seed}:{task}:{split}"), {}
    while len(chosen) < n:
        text = spec.draw(rng, label=len(chosen) % 2 == 0)
        if split_of(text) == split and text not in chosen:
            chosen[text] = None
    return [(spec.prompt(text), spec.answer(text)) for text in chosen]


def training_examples(task: str, batch_size: int, rng: random.Random) -> list[tuple[str, str]]:
    """A batch of random train-split pairs (answers with their newline, as the adapters learn them)."""
    spec, pairs = TASKS[task], []
    while len(pairs) < batch_size:
        text = spec.draw(rng, label=rng.random() < 0.5)
        if split_of(text) == "train":
            pairs.append((spec.prompt(text), spec.answer(text) + "\n"))
    return pairs


def expected_answer(prompt: str) -> Optional[str]:
    """The right answer to `QUESTION TEXT` when a task asks QUESTION about a TEXT of its alphabet, else None."""
    name = task_of(prompt)
    if name is None:
        return None
    task = TASKS[name]
    return task.answer(prompt.rstrip("\n")[len(task.question) + 1:])


def task_of(prompt: str) -> Optional[str]:
    """The task that asks a prompt (the one whose expected answer it has), else None."""
    prompt = prompt.rstrip("\n")
    for task in TASKS.values():
        text = prompt[len(task.question) + 1:] if prompt.startswith(task.question + " ") else ""
        if text and set(text) <= set(task.alphabet + task.needle):
            return task.name
    return None


def first_line(text: str) -> str:
    """How answers are compared: the text up to its first newline, stripped."""
    return text.split("\n")[0].strip()


def exact_match(answers: Sequence[str], expected: Sequence[str]) -> float:
    if len(answers) != len(expected) or not answers:
        raise ValueError(f"exact_match: {len(answers)} answers for {len(expected)} expected ones")
    return sum(first_line(a) == first_line(e) for a, e in zip(answers, expected)) / len(answers)


def read_test_rows(path: Path) -> list[dict]:
    """The preset's test.jsonl: one {task, prompt, answer} object a line."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def load_base_model(folder: Path) -> LlamaForCausalLM:
    """The saved base in float32, named BASE_NAME so that adapters made on it are portable."""
    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    model.name_or_path = BASE_NAME
    return model


def generate(model, prompts: Sequence[str]) -> list[str]:
    """Greedy answers, each cut at its first newline."""
    return [first_line(a) for a in strings.generate(model, TOKENIZER, prompts, MAX_NEW_TOKENS)]


class QuestionsEvaluator:
    """Exact match of the base model, or of it with one adapter (switched by folder), on each task."""

    def __init__(self, base_folder: str, tasks: Optional[Sequence[str]] = None, n: int = EVAL_SIZE):
        unknown = [task for task in tasks or () if task not in TASKS]
        if unknown:
            raise ValueError(f"tasks {unknown}: choose among {', '.join(TASKS)}")
        self.model = load_base_model(Path(base_folder))
        self.loaded: dict[str, str] = {}  # adapter folder -> peft adapter name
        self.tasks = list(tasks or TASKS)
        self.n = n

    def accuracy(self, task: str, adapter: Optional[str] = None, split: str = "test", scale: float = 1.0) -> float:
        """Exact match on `n` inputs of a task's split; `scale` multiplies the adapter's update (alpha search)."""
        pairs = examples(task, split, self.n)
        return run_with_adapter(self, adapter, scale, lambda model: exact_match(generate(model, [p for p, _ in pairs]),
                                                                   [a for _, a in pairs]))

    def generate(self, prompts: Sequence[str], adapter: Optional[str] = None) -> list[str]:
        """Greedy answers (first line) to prompts such as `even? 4821` (the newline is added if missing)."""
        prompts = [prompt if prompt.endswith("\n") else prompt + "\n" for prompt in prompts]
        return run_with_adapter(self, adapter, 1.0, lambda model: generate(model, prompts))

    @staticmethod
    def expected(prompt: str) -> Optional[str]:
        """The right answer to a prompt one of the tasks asks (`even? 4821` -> `no`), else None."""
        return expected_answer(prompt)

    @staticmethod
    def task_of(prompt: str) -> Optional[str]:
        """The task a prompt belongs to, for the cross-task table; None if no task asks it."""
        return task_of(prompt)

    def forget(self, adapter: str) -> None:
        forget_adapter(self, adapter)
