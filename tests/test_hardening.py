"""Hostile inputs, one class at a time (issue: never lose a file, never write a wrong adapter, never a traceback).

Every refusal: exit code 2, one stderr line naming the input and the problem, nothing written, nothing else changed.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from coremerge import load_adapter
from coremerge.cli import main
from coremerge.formats.output_folder import REPORT_NAME
from coremerge.formats.validation import PEFT_TASK_TYPES
from coremerge.webapp.package import model_card

from conftest import peft_deltas, read_config

KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
KOHYA_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def run_cli(capsys, *args):
    """`coremerge merge` in-process: (exit code, stderr lines)."""
    try:
        code = main(["merge", *map(str, args)])
    except SystemExit as exited:
        code = exited.code
    return code, capsys.readouterr().err.strip().splitlines()


def refused(capsys, args, message, out):
    code, lines = run_cli(capsys, *args, "--output", out)
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("coremerge: error: ")
    assert message in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.is_symlink(), p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def plain(tmp_path, adapters):
    return Path(shutil.copytree(adapters["plain"], tmp_path / "plain"))


def earlier_output(capsys, source, out):
    code, _ = run_cli(capsys, source, "--output", out)
    assert code == 0
    return out


# --- 1. never delete what coremerge did not write ---

def test_a_user_file_beside_an_earlier_merge_is_kept(capsys, tmp_path, plain):
    out = earlier_output(capsys, plain, tmp_path / "out")
    (out / "thesis.tex").write_text("years of work")
    before = snapshot(out)
    refused(capsys, [plain], f"--output {out}: the folder holds thesis.tex, which coremerge did not write", out)
    assert snapshot(out) == before


def test_an_earlier_output_with_its_model_card_is_replaced(capsys, tmp_path, plain, adapters):
    out = earlier_output(capsys, plain, tmp_path / "out")
    report = json.loads((out / REPORT_NAME).read_text())
    (out / "README.md").write_text(model_card(report, ["plain"], "Merged LoRA adapter", "code"))
    code, _ = run_cli(capsys, adapters["rslora"], "--output", out)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", REPORT_NAME]
    assert json.loads((out / REPORT_NAME).read_text())["sources"][0]["source"] == str(adapters["rslora"])


@pytest.mark.parametrize("files, foreign", [
    ({"README.md": "# my notes on this merge\n"}, "README.md"),  # a README the user wrote, not the model card
    ({"notes": None}, "notes"),  # a sub-folder
])
def test_foreign_entries_in_an_earlier_output_are_named(capsys, tmp_path, plain, files, foreign):
    out = earlier_output(capsys, plain, tmp_path / "out")
    for name, text in files.items():
        (out / name).mkdir() if text is None else (out / name).write_text(text)
    before = snapshot(out)
    refused(capsys, [plain], f"the folder holds {foreign}, which coremerge did not write", out)
    assert snapshot(out) == before


def test_a_user_adapter_or_a_foreign_report_is_not_replaced(capsys, tmp_path, plain, adapters):
    user_adapter = Path(shutil.copytree(adapters["rslora"], tmp_path / "mine"))
    refused(capsys, [plain], "the folder holds README.md", user_adapter)  # peft's model card is not coremerge's
    (user_adapter / "README.md").unlink()
    before = snapshot(user_adapter)
    refused(capsys, [plain], "the folder holds adapter_config.json (and no merge_report.json)", user_adapter)
    assert snapshot(user_adapter) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / REPORT_NAME).write_text('{"accuracy": 0.93}')
    refused(capsys, [plain], "the folder holds a merge_report.json that is not coremerge's", other)
    assert (other / REPORT_NAME).read_text() == '{"accuracy": 0.93}'


def test_output_locations_that_cannot_be_used(capsys, tmp_path, plain):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    refused(capsys, [plain], "is a file, not a folder", a_file)
    refused(capsys, [plain], f"{a_file} is a file (or a broken link), not a folder", a_file / "out")
    refused(capsys, [plain], "give a folder name", "")
    refused(capsys, [plain], "give a folder name, not the root", "/")
    refused(capsys, [plain], "the name is too long", tmp_path / ("n" * 245))  # legal, but not with .partial-XXXXXXXX
    refused(capsys, [plain], f"is (or holds) the input {plain}", plain)
    refused(capsys, [plain / "adapter_model.safetensors"], "is (or holds) the input", tmp_path)
    assert a_file.read_text() == "x" and sorted(p.name for p in plain.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_the_output_is_checked_before_any_adapter_is_read(capsys, tmp_path, plain):
    (plain / "adapter_config.json").write_text("{broken")
    refused(capsys, [plain], "the name is too long", tmp_path / ("n" * 245))


def test_a_symlinked_output_is_refused_and_stays_a_link(capsys, tmp_path, plain):
    target = earlier_output(capsys, plain, tmp_path / "target")
    link = tmp_path / "link"
    link.symlink_to(target)
    before = snapshot(target)
    refused(capsys, [plain], f"--output {link}: is a symbolic link (to {target})", link)
    assert link.is_symlink() and snapshot(target) == before


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_new_folders_follow_the_umask(capsys, tmp_path, plain, umask, mode):
    old = os.umask(umask)
    try:
        code, _ = run_cli(capsys, plain, "--output", tmp_path / "out")
    finally:
        os.umask(old)
    assert code == 0 and stat.S_IMODE((tmp_path / "out").stat().st_mode) == mode
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()} == {mode & 0o666}


# --- 2. every number and tensor checked at load time ---

def rewrite_config(folder: Path, text: str) -> None:
    (folder / "adapter_config.json").write_text(text)


@pytest.mark.parametrize("field, value, message", [
    ("lora_alpha", "NaN", "lora_alpha must be a finite positive number, not nan"),
    ("lora_alpha", "Infinity", "lora_alpha must be a finite positive number, not inf"),
    ("lora_alpha", '"8"', "lora_alpha must be a finite positive number, not '8'"),
    ("lora_alpha", "true", "lora_alpha must be a finite positive number, not True"),
    ("r", "4.0", "r must be a positive integer, not 4.0"),
    ("r", "1e999", "r must be a positive integer, not inf"),
    ("rank_pattern", '{"q_proj": "2"}', "rank_pattern['q_proj'] must be a positive integer, not '2'"),
    ("alpha_pattern", '{"v_proj": NaN}', "alpha_pattern['v_proj'] must be a finite positive number, not nan"),
    ("alpha_pattern", '{"v_proj": -3}', "alpha_pattern['v_proj'] must be a finite positive number, not -3"),
    ("alpha_pattern", "[3]", "alpha_pattern must be an object, not [3]"),
    ("use_rslora", '"false"', "use_rslora must be true or false, not 'false'"),
    ("base_model_name_or_path", "7", "base_model_name_or_path must be a string, not 7"),
    ("task_type", '"x"', "task_type must be one of SEQ_CLS, SEQ_2_SEQ_LM, CAUSAL_LM, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION or null, not 'x'"),
])
def test_config_numbers_and_types(capsys, tmp_path, plain, field, value, message):
    text = (plain / "adapter_config.json").read_text()
    config = json.loads(text)
    rewrite_config(plain, json.dumps({k: v for k, v in config.items() if k != field})[:-1] + f', "{field}": {value}}}')
    refused(capsys, [plain], f"{plain}: adapter_config.json is malformed ({message})", tmp_path / "out")


def test_task_types_are_peft_own():
    from peft import TaskType

    assert set(PEFT_TASK_TYPES) == {t.value for t in TaskType}


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool, torch.uint8])
def test_integer_or_boolean_factors_are_refused(capsys, tmp_path, plain, dtype):
    tensors = load_file(plain / "adapter_model.safetensors")
    tensors[KEY_B] = (tensors[KEY_B] * 10).to(dtype)
    save_file(tensors, plain / "adapter_model.safetensors")
    name = str(dtype).removeprefix("torch.")
    refused(capsys, [plain], f"{plain}: tensor {KEY_B} is {name}, not a floating-point LoRA factor", tmp_path / "out")


@pytest.mark.parametrize("change, shapes", [
    (lambda t: t[KEY_A].reshape(-1), "(128,), base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight (32, 4)"),
    (lambda t: t[KEY_A][None], "(1, 4, 32), base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight (32, 4)"),
    (lambda t: t[KEY_A][:0], "(0, 32)"),
])
def test_factors_of_the_wrong_number_of_dimensions(capsys, tmp_path, plain, change, shapes):
    tensors = load_file(plain / "adapter_model.safetensors")
    tensors[KEY_A] = change(tensors).contiguous()
    save_file(tensors, plain / "adapter_model.safetensors")
    refused(capsys, [plain], f"module model.layers.0.self_attn.q_proj has inconsistent LoRA shapes ({KEY_A} {shapes}",
            tmp_path / "out")


@pytest.mark.parametrize("flags, message", [
    (["--alpha", "nan"], "--alpha nan: must be a finite number"),
    (["--weights", "nan"], "--weights nan: must be finite numbers"),
    (["--method", "ties", "--density", "nan"], "--density nan: must be a number in (0, 1]"),
    (["--weights", "1e300", "--alpha", "1e300"], "is too large to merge"),
])
def test_flags_that_are_not_finite_or_overflow(capsys, tmp_path, plain, flags, message):
    refused(capsys, [plain, *flags], message, tmp_path / "out")



@pytest.mark.parametrize("value, message", [
    (1e308, f"{KEY_B} times its scaling 2 (alpha / r) overflows"),  # every entry overflows when scaled
    (1e306, "is too large to merge"),  # entries stay finite (their sum does not): read, then refused by size
])
def test_float64_factors_that_overflow_with_their_scaling(capsys, tmp_path, plain, value, message):
    tensors = load_file(plain / "adapter_model.safetensors")
    tensors[KEY_B] = torch.full(tensors[KEY_B].shape, value, dtype=torch.float64)
    save_file(tensors, plain / "adapter_model.safetensors")
    refused(capsys, [plain], message, tmp_path / "out")

def kohya_file(path: Path, alpha) -> Path:
    generator = torch.Generator().manual_seed(3)
    tensors = {f"{KOHYA_Q}.lora_down.weight": torch.randn(4, 8, generator=generator),
               f"{KOHYA_Q}.lora_up.weight": torch.randn(8, 4, generator=generator)}
    if alpha is not None:
        tensors[f"{KOHYA_Q}.alpha"] = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def test_kohya_alpha_zero_or_missing_means_alpha_equals_rank(tmp_path):
    """As kohya's LoRAModule reads it; the module is merged, not dropped as a zero update."""
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    updates = {}
    for alpha in (0.0, None, 4.0, 2.0):
        adapter = load_adapter(str(kohya_file(tmp_path / f"{alpha}.safetensors", alpha)))
        with adapter.open() as reader:
            factors = adapter.read_factors(reader, name)
        updates[alpha] = factors.b @ factors.a
    assert torch.equal(updates[0.0], updates[4.0]) and torch.equal(updates[None], updates[4.0])
    assert torch.allclose(updates[2.0], updates[4.0] / 2)


@pytest.mark.parametrize("alpha, message", [
    (float("nan"), "is nan; a kohya alpha must be a finite number >= 0"),
    (-4.0, "is -4.0; a kohya alpha must be a finite number >= 0"),
    (torch.tensor([4.0, 4.0]), "must be one number (a scalar tensor), not a tensor of shape (2,)"),
    (torch.tensor(True), "must be one number (a scalar tensor), not a bool tensor"),
])
def test_bad_kohya_alphas(capsys, tmp_path, alpha, message):
    path = kohya_file(tmp_path / "k.safetensors", alpha)
    refused(capsys, [path], f"{path}: {KOHYA_Q}.alpha {message}", tmp_path / "out")


# --- 3. what is written is finite ---

@pytest.mark.parametrize("alpha", ["1e30", "1e6"])
def test_an_overflow_in_float16_is_a_refusal_suggesting_a_wider_dtype(capsys, tmp_path, plain, alpha):
    line = refused(capsys, [plain, "--alpha", alpha, "--dtype", "float16"],
                   "the merged adapter does not fit in float16", tmp_path / "out")
    assert "write it with --dtype float32" in line and not list(tmp_path.glob(".out*"))
    code, _ = run_cli(capsys, plain, "--alpha", "1e6", "--dtype", "float32", "--output", tmp_path / "wide")
    assert code == 0



def test_an_update_too_small_for_float16_is_a_refusal_suggesting_float32(capsys, tmp_path, plain):
    line = refused(capsys, [plain, "--alpha", "1e-9", "--dtype", "float16"],
                   "the merged update is too small for float16 (it would be written as zeros)", tmp_path / "out")
    assert "write it with --dtype float32" in line and not list(tmp_path.glob(".out*"))

# --- 4. one line for every failure ---

def test_a_refused_pickle_gives_no_advice_to_run_it(capsys, tmp_path, adapters):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(adapters["plain"] / "adapter_config.json", folder)
    torch.save({"w": torch.ones(2), "payload": Exception("x")}, folder / "adapter_model.bin")
    line = refused(capsys, [folder], "it asks for exceptions.Exception", tmp_path / "out")
    assert "weights_only=False" not in line and "weights_only` set to `False`" not in line
    assert "coremerge does not run pickled code" in line


def test_a_pickle_that_is_not_a_state_dict(capsys, tmp_path, adapters):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(adapters["plain"] / "adapter_config.json", folder)
    torch.save([torch.ones(2)], folder / "adapter_model.bin")
    refused(capsys, [folder], "adapter_model.bin is not a state dict", tmp_path / "out")


def test_control_characters_in_names_are_escaped(capsys, tmp_path):
    line = refused(capsys, ["evil\x1b[31mred\x07"], "evil\\x1b[31mred\\x07: no such file or folder", tmp_path / "out")
    assert "\x1b" not in line and "\x07" not in line


def test_one_adapter_alone_with_a_changing_method_warns_once(capsys, tmp_path, plain):
    code, lines = run_cli(capsys, plain, "--method", "ties", "--output", tmp_path / "out")
    assert code == 0 and len(lines) == 1 and lines[0].startswith("coremerge: warning: ")
    assert "--method ties changes it" in lines[0]
    assert json.loads((tmp_path / "out" / REPORT_NAME).read_text())["warnings"] == [
        lines[0].removeprefix("coremerge: warning: ")]
    code, lines = run_cli(capsys, plain, "--method", "ta", "--output", tmp_path / "copy")
    assert code == 0 and lines == [] and json.loads((tmp_path / "copy" / REPORT_NAME).read_text())["warnings"] == []


def test_written_adapter_loads_in_peft_with_the_input_update(capsys, tmp_path, plain, base_model):
    """The baseline every refusal above is measured against: a valid adapter alone comes out as itself."""
    code, _ = run_cli(capsys, plain, "--method", "ta", "--output", tmp_path / "out")
    assert code == 0 and read_config(tmp_path / "out")["r"] >= 1
    expected, written = peft_deltas(base_model, plain), peft_deltas(base_model, tmp_path / "out")
    assert expected.keys() == written.keys()
    for name in expected:
        assert torch.allclose(written[name], expected[name], atol=1e-6, rtol=1e-4)


# --- real processes: permission errors (as an unprivileged user) and exit codes ---

def as_nobody(*args, cwd):
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, *args],
                          capture_output=True, text=True, cwd=cwd, env={**os.environ, "HOME": str(cwd)})


@pytest.fixture
def world_dir(tmp_path_factory):
    """A folder another user can reach (pytest's own are private to root)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="coremerge-perm-"))
    folder.chmod(0o777)
    if shutil.which("setpriv") is None or os.geteuid() != 0 or as_nobody("-c", "import coremerge", cwd=folder).returncode:
        shutil.rmtree(folder)
        pytest.skip("needs root, setpriv, and a checkout and venv that another user can read")
    yield folder
    shutil.rmtree(folder)


def test_permission_errors_say_so(world_dir, adapters):
    plain = Path(shutil.copytree(adapters["plain"], world_dir / "plain"))
    for p in [plain, *plain.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    (plain / "adapter_model.safetensors").chmod(0o000)
    result = as_nobody("-m", "coremerge", "merge", str(plain), "--output", str(world_dir / "out"), cwd=world_dir)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"coremerge: error: {plain}: cannot read adapter_model.safetensors (permission denied)"]
    (plain / "adapter_model.safetensors").chmod(0o644)
    locked = world_dir / "locked"
    locked.mkdir(mode=0o555)
    result = as_nobody("-m", "coremerge", "merge", str(plain), "--output", str(locked / "out"), cwd=world_dir)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"coremerge: error: --output {locked / 'out'}: permission denied: cannot write in {locked}"]


def test_real_exit_codes(tmp_path, plain):
    out = tmp_path / "out"
    ok = subprocess.run([sys.executable, "-m", "coremerge", "merge", str(plain), "--output", str(out)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stderr == "" and (out / REPORT_NAME).is_file()
    (out / "keep.txt").write_text("mine")
    bad = subprocess.run([sys.executable, "-m", "coremerge", "merge", str(plain), "--alpha", "1e30", "--dtype",
                          "float16", "--output", str(out)], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "keep.txt" in bad.stderr
    assert (out / "keep.txt").read_text() == "mine" and "Traceback" not in bad.stderr


@pytest.mark.parametrize("blank", ["", "   "])
def test_an_empty_source_is_named_by_its_position(blank, capsys, plain, tmp_path):
    refused(capsys, [plain, blank], "source 2 is empty; give a Hub ID, folder or .safetensors file", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_same_adapter_twice_merges_with_a_warning(capsys, plain, tmp_path):
    """Two spellings of one folder resolve to one weights file: the merge runs (as given) and says so."""
    (tmp_path / "link").symlink_to(plain)
    code, lines = run_cli(capsys, plain, tmp_path / "link", "--output", tmp_path / "out")
    assert code == 0
    warning = f"coremerge: warning: {plain} and {tmp_path / 'link'} are the same adapter: it counts twice"
    assert lines == [warning]
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report["warnings"] == [warning.removeprefix("coremerge: warning: ")]


def test_two_different_adapters_give_no_duplicate_warning(capsys, adapters, tmp_path):
    code, lines = run_cli(capsys, adapters["plain"], adapters["rslora"], "--output", tmp_path / "out")
    assert code == 0 and lines == []
