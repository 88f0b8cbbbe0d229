"""`pip install .` gives a package that works without the checkout: every sub-package, the templates, the presets."""

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "coremerge").rglob("__init__.py")}
    assert listed - {"coremerge.presets_data"} == found


def test_the_wheel_carries_templates_and_presets(tmp_path):
    source = tmp_path / "source"  # a copy: setuptools leaves build/ and *.egg-info where it builds
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "coremerge", "presets"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("coremerge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(ROOT / "presets")) for p in (ROOT / "presets").rglob("*") if p.is_file()}
    assert {f"coremerge/presets_data/{name}" for name in shipped} <= names
    assert {f"coremerge/webapp/templates/{p.name}" for p in (ROOT / "coremerge/webapp/templates").iterdir()} <= names
    assert not any(name.startswith(("tests/", "presets/")) for name in names)
