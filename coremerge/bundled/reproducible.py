"""Adapter folders that the preset build scripts write with the same bytes on every run."""

import json
from pathlib import Path


def make_reproducible(folder: Path) -> None:
    """peft writes target_modules from a set (its order varies between runs) and a model card naming
    the local base folder: sort the one, drop the other."""
    config_file = Path(folder) / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (Path(folder) / "README.md").unlink(missing_ok=True)
