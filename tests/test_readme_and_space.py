"""The README's Space front matter and commands, and the Space's rules for app.py, cannot drift."""

import ast
import re
from pathlib import Path

import yaml

from coremerge.formats.sources import HUB_ID
from coremerge.presets import list_presets

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def front_matter() -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", README, re.S)
    assert match, "README.md must start with the Space front matter"
    return yaml.safe_load(match.group(1))


def test_front_matter_is_a_gradio_space_listing_every_model_the_presets_use():
    meta = front_matter()
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["short_description"]
    import gradio

    assert meta["sdk_version"] == gradio.__version__
    used = {HUB_ID.match(s)["repo"] for p in list_presets() if not p.bundled
            for s in [p.base_model, *(a.source for a in p.adapters)]}
    assert used <= set(meta["models"]), sorted(used - set(meta["models"]))


def test_readme_holds_the_install_and_run_command_and_the_test_command_that_ci_runs():
    install_and_run = ("python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements-dev.txt -e . "
                       "&& python app.py")
    assert f"    {install_and_run}\n" in README
    assert "\n    pytest\n" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert install_and_run.removesuffix(" && python app.py") in ci and "\npytest\n" in ci


def test_app_imports_spaces_first_and_launches_without_a_fixed_host_or_port():
    tree = ast.parse((ROOT / "app.py").read_text())
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert isinstance(imports[0], ast.Import) and imports[0].names[0].name == "spaces"
    launches = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute) and node.func.attr == "launch"]
    assert launches and all(k.arg not in ("server_name", "server_port") for c in launches for k in c.keywords)


def test_requirements_pin_the_cpu_torch_and_every_dependency():
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    pins = [line for line in lines if line]
    assert all("==" in line for line in pins), pins
    assert "torch==2.13.0" in pins


def test_relative_links_in_the_readme_and_docs_resolve_inside_the_repository():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
        local = [link for link in links if not re.match(r"^[a-z]+:", link)]
        for link in local:
            target = (page.parent / link).resolve()
            assert target.exists() and ROOT.resolve() in target.parents, (page.name, link)
