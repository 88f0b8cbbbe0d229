"""Rebuild the bundled questions preset (presets/questions/) from scratch, seeded, offline, on CPU, one torch thread.

    python scripts/build_questions_preset.py [--output presets/questions] [--reuse-base]

1. Pretrain the tiny byte-level Llama of coremerge.bundled.strings as scripts/build_text_preset.py does (Python's
   own documentation text, pydoc_data.topics, then the same text plus copy drills); save it with its tokenizer
   files. The copy drills matter: on a base pretrained on text alone, adapters did not learn the questions.
2. Train one LoRA adapter per question of coremerge.bundled.questions on its own task's training inputs, with a
   distillation penalty: on random windows of the same documentation text, the KL divergence of the adapted
   model's next-byte distribution from the base's is added to the loss, so that each adapter changes the
   model where its task needs it and leaves the rest as the base has it (never on another task's data).
3. Choose the merge settings on the validation split (method x alpha, core space), then record test exact
   match of the base, every adapter on every task and the chosen merge; write test.jsonl and the manifest.

One torch thread and deterministic kernels throughout (set here, whatever the machine's core count), so that a
rebuild writes the same bytes; the build prints each phase's wall time and one sha256 over every written file.
About 15 minutes from scratch on a shared 2-core machine, most of it pretraining the base.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded (set before huggingface_hub is imported)

import argparse
import hashlib
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from pydoc_data.topics import topics
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import build_text_preset  # noqa: E402
from build_text_preset import encode_examples, lr_at, text_batches  # noqa: E402

from coremerge import MergeOptions, merge_to_folder  # noqa: E402
from coremerge.bundled import questions  # noqa: E402
from coremerge.bundled.reproducible import make_reproducible  # noqa: E402
from coremerge.presets import MANIFEST_NAME, write_manifest  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 8
ADAPTER_LR = 1e-3
KL_WEIGHT = 1.0
TASK_BATCH, TEXT_BATCH = 32, 8
CHOICES = {"ta": (0.4, 0.5, 0.6, 0.7, 0.8, 1.0), "tsv": (0.6, 0.7, 0.8, 0.9, 1.0)}  # merge settings tried on validation


def make_deterministic() -> None:
    """One torch thread (float sums then run in the same order whatever the machine's core count) and
    deterministic kernels: a rebuild writes the same bytes."""
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)


def file_digests(output: Path) -> str:
    """One sha256 over every written file (relative path and bytes), to compare two rebuilds."""
    digest = hashlib.sha256()
    for path in sorted(p for p in output.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(output)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


class Phases:
    """Wall time per build phase, printed at the end (where the rebuild's time goes)."""

    def __init__(self):
        self.times, self.last = {}, time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = now - self.last
        self.last = now
        print(f"phase {name}: {self.times[name]:.0f} s", flush=True)


def documentation_text() -> bytes:
    return "\n\n".join(topics[key] for key in sorted(topics)).encode()


def build_base(folder: Path, text_steps: int, copy_steps: int, seed: int) -> None:
    """The text preset's pretraining; saved in bf16 with the tokenizer files beside the weights."""
    build_text_preset.build_base(folder, text_steps, copy_steps, seed)
    questions.tokenizer().save_pretrained(str(folder))


def build_adapter(base_folder: Path, task: str, folder: Path, steps: int, seed: int) -> None:
    """LoRA on the task's examples plus KL(base || adapted) on documentation text windows."""
    model = questions.load_base_model(base_folder)  # named BASE_NAME, recorded as the adapters' base model
    torch.manual_seed(seed)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=LORA_TARGETS,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    rng = random.Random(f"{seed}:{task}:train")
    text = text_batches(documentation_text(), TEXT_BATCH, torch.Generator().manual_seed(seed))
    parameters = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=ADAPTER_LR, weight_decay=0.0)
    peft_model.train()
    bar = tqdm(range(steps), desc=f"adapter {task}", unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, ADAPTER_LR, warmup=max(1, steps // 20))
        loss = peft_model(**encode_examples(questions.training_examples(task, TASK_BATCH, rng))).loss
        windows = text(step)["input_ids"]
        with torch.no_grad(), peft_model.disable_adapter():
            reference = F.log_softmax(peft_model(input_ids=windows).logits, -1)
        adapted = F.log_softmax(peft_model(input_ids=windows).logits, -1)
        kl = F.kl_div(adapted, reference, log_target=True, reduction="batchmean") / windows.shape[1]
        loss = loss + KL_WEIGHT * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", kl=f"{kl.item():.4f}")
    peft_model.save_pretrained(str(folder))
    make_reproducible(folder)


def choose_merge(evaluator: questions.QuestionsEvaluator, adapters: dict[str, str], scratch: Path) -> tuple[dict, float]:
    """The method and alpha (core space) with the best validation average normalized accuracy."""
    own = {task: evaluator.accuracy(task, folder, "validation") for task, folder in adapters.items()}
    best, best_score = None, -1.0
    for method, alphas in CHOICES.items():
        folder = scratch / method
        merge_to_folder(list(adapters.values()), MergeOptions.create(method=method, space="core"), folder)
        for alpha in alphas:
            score = sum(evaluator.accuracy(task, str(folder), "validation", alpha) / own[task]
                        for task in adapters) / len(adapters)
            print(f"validation: {method} alpha={alpha}: {score:.3f}")
            if score > best_score:
                best, best_score = {"method": method, "space": "core", "alpha": alpha}, score
        evaluator.forget(str(folder))
    return best, best_score


def evaluate(output: Path, phases: Phases) -> dict:
    """Test exact match: base and each adapter on every task, and the merge chosen on validation."""
    evaluator = questions.QuestionsEvaluator(str(output / "base"))
    tasks = evaluator.tasks
    adapters = {task: str(output / "adapters" / task) for task in tasks}
    with tempfile.TemporaryDirectory() as scratch:
        merge, validation = choose_merge(evaluator, adapters, Path(scratch))
        phases.done("choose merge on validation")
        merged = Path(scratch) / "merged"
        merge_to_folder(list(adapters.values()), MergeOptions.create(**merge), merged)
        runs = {"base": None, **adapters, "merged": str(merged)}
        table = {run: {task: evaluator.accuracy(task, path, "test") for task in tasks}
                 for run, path in tqdm(runs.items(), desc="evaluate", unit="model")}
        phases.done("test accuracies")
    own = {task: table[task][task] for task in tasks}
    normalized = {task: table["merged"][task] / own[task] for task in tasks}
    result = {
        "split": "test", "n": evaluator.n,
        "base": table["base"],
        "adapters": own,
        "merge": merge,
        "merge_validation_normalized": round(validation, 4),
        "merged": table["merged"],
        "merged_normalized": {"average": round(sum(normalized.values()) / len(tasks), 4),
                              "worst": round(min(normalized.values()), 4)},
        "adapter_by_task": {task: table[task] for task in tasks},
        "quick": quick_check(output, tasks),
    }
    phases.done("quick check")
    return result


def quick_check(output: Path, tasks: list[str]) -> dict:
    """The same figures on the first CHECK_SIZE test rows of each task, which the fast tests reproduce."""
    evaluator = questions.QuestionsEvaluator(str(output / "base"), n=questions.CHECK_SIZE)
    return {
        "n": evaluator.n,
        "base": {task: evaluator.accuracy(task, None, "test") for task in tasks},
        "adapters": {task: evaluator.accuracy(task, str(output / "adapters" / task), "test") for task in tasks},
    }


def write_test_rows(output: Path) -> None:
    """test.jsonl: the test split the accuracies are measured on, one {task, prompt, answer} a line."""
    rows = [{"task": task, "prompt": prompt, "answer": answer}
            for task in questions.TASKS for prompt, answer in questions.examples(task, "test", questions.EVAL_SIZE)]
    (output / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def print_table(accuracy: dict) -> None:
    print(f"{'task':<8}{'base':>7}{'adapter':>9}{'merged':>8}   merge: {accuracy['merge']}")
    for task in accuracy["base"]:
        print(f"{task:<8}{accuracy['base'][task]:>7.2f}{accuracy['adapters'][task]:>9.2f}"
              f"{accuracy['merged'][task]:>8.2f}")
    print(f"merged, normalized: {accuracy['merged_normalized']}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "presets" / "questions")
    parser.add_argument("--text-steps", type=int, default=500)
    parser.add_argument("--copy-steps", type=int, default=300)
    parser.add_argument("--adapter-steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse-base", action="store_true",
                        help="keep the base already in --output (pretraining is half the time); retrain the adapters")
    args = parser.parse_args(argv)
    make_deterministic()

    started = time.perf_counter()
    output = args.output
    phases = Phases()
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
    phases.done("base")
    for task in questions.TASKS:
        build_adapter(output / "base", task, output / "adapters" / task, args.adapter_steps, args.seed)
        phases.done(f"adapter {task}")
    write_test_rows(output)
    accuracy = evaluate(output, phases)
    (output / "accuracy.json").write_text(json.dumps(accuracy, indent=1) + "\n")
    write_manifest(output)
    print_table(accuracy)
    print(f"files sha256: {file_digests(output)}")
    print(f"built {output} in {time.perf_counter() - started:.0f} s (load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
