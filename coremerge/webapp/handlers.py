"""The app's event handlers: plain functions of component values, importable and testable without a browser.

Bad input raises `gr.Error` with the library's one-line message; nothing else reaches the page.
"""

import functools
import logging
import shutil
import threading
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import gradio as gr
import spaces

from ..comparison.plots import accuracy_chart, overlap_chart, spectra_chart
from ..errors import CoreMergeError, HubError
from ..formats.loading import load_adapters
from ..merging.methods import METHODS, Parameter, get_method
from ..merging.options import MergeOptions
from ..presets import Preset, find_preset, list_presets
from . import budget as budgets
from .availability import require_available
from .budget import Budget, merge_slot
from .cache import ResultCache
from .hub_push import push_folder
from .render import comparison_html, rank_rows, report_markdown, summary_markdown
from . import validation
from .sources import scrub, trusted_sources
from .uploads import LIMITS_TEXT as UPLOAD_LIMITS
from .uploads import unpack_uploads, uploaded_paths
from .workflow import (LIMITS, AdapterRow, MergeOutcome, MergeRequest, check_rows, comparison_seconds,
                       default_prompts_text, has_comparison, prompts_from_text, run_comparison, run_merge, uses_preset_adapters, warm_up)

log = logging.getLogger("coremerge.app")
DEFAULT_PRESET = "digits"
ADAPTER_COLUMNS = ["Hub ID, preset path or upload:file", "Name", "Weight"]
UPLOAD_LABEL = "Upload LoRA files (each appears as a row upload:<file name>)"
TOKEN_INFO = ("for your private or gated Hub adapters; used for this merge only, never stored or shown. Without it "
              "Hub IDs are fetched with no token.")
CACHE = ResultCache()


def _unique_parameters() -> list[Parameter]:
    """Each method parameter once, in registry order: one UI control each."""
    seen: dict[str, Parameter] = {}
    for method in METHODS.values():
        for parameter in method.parameters:
            seen.setdefault(parameter.name, parameter)
    return list(seen.values())


PARAMETERS = _unique_parameters()


INTERNAL_ERROR = ("the server could not finish this request; check the adapters and settings, or try a bundled "
                  "preset (the details are in the server's log)")


def user_errors(handler):
    """CoreMergeError -> gr.Error with its message (server paths scrubbed); anything else -> one neutral line,
    the traceback in the server's log. No class name or server path reaches the page."""

    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except gr.Error:
            raise
        except CoreMergeError as error:
            raise gr.Error(scrub(" ".join(str(error).split())), print_exception=False) from None
        except Exception:  # noqa: BLE001 - the page gets one neutral line, the log the details
            log.error("error in %s:\n%s", handler.__name__, traceback.format_exc())
            raise gr.Error(INTERNAL_ERROR, print_exception=False) from None

    return wrapped


# Presets and methods


def preset_choices() -> list[tuple[str, str]]:
    """(label, name) for the preset picker: bundled (offline) presets first."""
    return [(p.title if p.bundled else f"{p.title} (needs the Hub)", p.name) for p in list_presets()]


def default_preset() -> str:
    names = [name for _, name in preset_choices()]
    return DEFAULT_PRESET if DEFAULT_PRESET in names else names[0]


def offline_presets() -> str:
    return ", ".join(p.name for p in list_presets() if p.bundled)


def describe_adapters(preset: Preset, sources: Sequence[str]) -> str:
    """The base model and ranks, read from the adapters' own configs."""
    try:
        require_available(preset)
        adapters = load_adapters(sources)
    except CoreMergeError as error:
        return f"⚠️ {scrub(str(error))}"
    ranks = sorted({r for a in adapters for r in a.ranks.values()})
    modules = len({m for a in adapters for m in a.modules})
    rank_text = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
    return (f"**Base model** `{adapters[0].base_model}` (from the adapters' configs) · {len(adapters)} adapters · "
            f"rank {rank_text} · {modules} modules")


def preset_view(name: str) -> tuple[list[list], str, str, str, bool]:
    """A preset's adapter rows, description, base model line, prompts text and whether it uses prompts."""
    preset = find_preset(validation.preset_name(name))
    rows = [[a.source, a.name, a.weight] for a in preset.adapters]
    where = "bundled, works offline" if preset.bundled else "needs the Hugging Face Hub"
    description = f"**{preset.title}** ({preset.kind}, {where}). {preset.description}"
    return (rows, description, describe_adapters(preset, preset.adapter_sources), default_prompts_text(preset),
            preset.kind in ("text-generation", "image-generation"))


@user_errors
def show_preset(name: str):
    """Preset picked: its adapter rows, description, base model, prompts (text presets only), merge defaults."""
    rows, description, base, prompts, uses_prompts = preset_view(name)
    defaults = find_preset(name).merge
    return (rows, description, base, gr.update(value=prompts, visible=uses_prompts),
            defaults.method, defaults.space, defaults.alpha)


def method_info(method: str) -> str:
    chosen = get_method(method)
    return f"**{chosen.display_name}**: {chosen.summary} [Paper]({chosen.paper_url})"


def method_settings(method: str, preset_name: Optional[str], space: Optional[str] = None) -> tuple[float, dict, str]:
    """Alpha, parameters and a line saying where they come from, for `method` on the preset in `space` (its tuned
    settings; without a preset or tuned settings, the method's defaults at alpha 1, or the preset's own alpha)."""
    if not preset_name:
        return 1.0, get_method(method).defaults(), "Settings: the method's defaults, alpha 1."
    preset = find_preset(validation.preset_name(preset_name))
    settings = preset.settings_for(method, validation.space_name(space) if space else None)
    values = ", ".join(f"{name.replace('_', ' ')} {value:g}" for name, value in
                       {"alpha": settings.alpha, **settings.params}.items() if name != "seed")
    where = ("tuned on this preset's validation split" if settings.tuned
             else f"the method's defaults; {preset.name} has no tuned settings for it")
    return settings.alpha, settings.params, f"Settings: {values} ({where})."


@user_errors
def show_method(method: str, preset_name: Optional[str] = None, space: Optional[str] = None):
    """Method picked: its explanation, and the preset's tuned alpha and parameters for it in the page's space (only
    its parameters shown); the method's defaults where the preset has none."""
    method = validation.method_name(method)
    alpha, params, where = method_settings(method, preset_name, space)
    updates = [gr.update(visible=p.name in params, value=params.get(p.name, p.default)) for p in PARAMETERS]
    return (f"{method_info(method)}\n\n{where}", alpha, *updates)


# Merge and compare


def adapter_rows(table) -> tuple[AdapterRow, ...]:
    """The adapter list's rows (blank rows skipped, an empty weight is 1); raises CoreMergeError naming a bad cell."""
    return tuple(AdapterRow(row.source, row.name, row.weight) for row in validation.adapter_rows(table)[0])


def build_request(preset_name: str, table, method: str, space: str, alpha: float, isotropize: bool,
                  rank: Optional[float], prompts_text: str, parameter_values: Sequence) -> MergeRequest:
    """Every control's value checked (validation) and put together; raises CoreMergeError in the page's words."""
    preset = find_preset(validation.preset_name(preset_name))
    method = validation.method_name(method)
    takes = get_method(method).defaults()
    params = {p.name: validation.parameter_value(p, value) for p, value in zip(PARAMETERS, parameter_values)
              if p.name in takes and value is not None and str(value).strip() != ""}
    options = MergeOptions.create(method=method, space=validation.space_name(space),
                                  alpha=validation.alpha_value(alpha), isotropize=isotropize is True,
                                  rank=validation.rank_value(rank), **params)
    uses_prompts = preset.kind in ("text-generation", "image-generation")
    prompts = prompts_from_text(validation.text_block(prompts_text, "prompts")) if uses_prompts else ()
    return MergeRequest(preset, adapter_rows(table), options, prompts)


def warm_up_in_background(preset_name: str) -> threading.Thread:
    """Load the default preset's model and its reference results while the page opens."""
    def run():
        try:
            warm_up(find_preset(preset_name))
        except Exception:  # noqa: BLE001 - the first merge will report the problem to the user
            log.error("warm-up of %s failed:\n%s", preset_name, traceback.format_exc())

    thread = threading.Thread(target=run, name="coremerge-warm-up", daemon=True)
    thread.start()
    return thread


# ZeroGPU runs only the comparison, in a forked worker; errors become gr.Error there, since the worker hands
# back any other exception as its class name only. Off ZeroGPU spaces.GPU is a no-op.
compare_on_gpu = spaces.GPU(duration=comparison_seconds)(user_errors(run_comparison))


def merge_outputs(outcome: MergeOutcome, cached: bool, notes: Sequence[str] = (), no_comparison: str = "") -> tuple:
    names = outcome.names
    comparison = outcome.comparison
    accuracy = getattr(comparison, "accuracy", None)
    warnings = "".join(f"⚠️ {note}\n\n" for note in notes)
    return (
        warnings + summary_markdown(outcome.report, comparison, outcome.seconds),
        comparison_html(comparison, no_comparison),
        gr.update(value=accuracy_chart(accuracy) if accuracy else None, visible=bool(accuracy)),
        report_markdown(outcome.report, outcome.seconds, names, cached, outcome.sources),
        rank_rows(outcome.report, names),
        spectra_chart(outcome.insights, names),
        overlap_chart(outcome.insights, names),
        str(outcome.zip_path),
        outcome.snippet,
    )


@user_errors
def merge_and_compare(preset_name: str, table, method: str, space: str, alpha: float, isotropize: bool,
                      rank: Optional[float], prompts_text: str, hub_token: Optional[str] = None, uploaded=None,
                      progress=gr.Progress(), *parameter_values):
    """The button: merge, explain and compare (cached by inputs); returns every result output and the cache key.

    `hub_token` is the visitor's Hub token (for their Hub IDs, this request only; never stored or shown);
    `uploaded` the files of the upload control; `parameter_values` the method parameter controls' values, in the
    order of PARAMETERS.
    """
    budget = Budget(budgets.REQUEST_SECONDS, progress)
    request = build_request(preset_name, table, method, space, alpha, isotropize, rank, prompts_text,
                            parameter_values)
    notes = validation.adapter_rows(table)[1]
    for note in notes:
        gr.Warning(note)
    token = (hub_token or "").strip() or None
    with CACHE.workdir() as folder:
        request, trusted = checked_request(request, uploaded, token, folder)
        budget.check("checking the adapters")
        key = request.key()
        outcome = CACHE.get(key)
        cached = outcome is not None
        if cached:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            try:
                with merge_slot(budget):
                    outcome = run_merge(request, folder, budget, compare=compare_on_gpu)
            except HubError as error:
                if request.preset.bundled:
                    raise HubError(scrub(str(error), trusted)) from None
                raise HubError(f"{scrub(str(error), trusted)}. Preset {request.preset.name} needs the Hugging Face "
                               f"Hub; the bundled presets ({offline_presets()}) work offline") from None
            except CoreMergeError as error:
                raise CoreMergeError(scrub(str(error), trusted)) from None
            outcome = CACHE.put(key, outcome, folder)
    return (*merge_outputs(outcome, cached, notes, request.no_comparison), key)


def checked_request(request: MergeRequest, uploaded, token: Optional[str], folder: Path):
    """The trust boundary and the row checks, before the merge slot: uploads unpacked into `folder`, every row a
    Hub ID fetched with the visitor's token (or none), an upload of this request or a preset path, then every row
    read and checked. Returns the request with the rows' locations, and the trusted sources (to scrub messages).
    """
    uploads = unpack_uploads(uploaded, folder / "uploads")
    trusted = trusted_sources([row.source for row in request.adapters], request.preset, uploads, token,
                              folder / "inputs")
    request = replace(request, adapters=tuple(
        replace(row, source=t.location, shown=t.shown, revision=t.revision)
        for row, t in zip(request.adapters, trusted)))
    if uses_preset_adapters(request):
        # the preset's own adapters: say at once if it needs the Hub (the base model only to compare on it)
        require_available(request.preset, base_model=has_comparison(request.preset))
    try:
        return replace(request, no_comparison=check_rows(request)), trusted
    except CoreMergeError as error:
        raise CoreMergeError(scrub(str(error), trusted)) from None


@user_errors
def add_upload_rows(uploaded, table):
    """Files uploaded: one row `upload:<file name>` each (a peft config goes with its weights, not in a row)."""
    rows = [list(r) for r in (table if isinstance(table, (list, tuple)) else [])
            if isinstance(r, (list, tuple)) and any(c not in (None, "") for c in r)]
    have = {str(r[0]) for r in rows if r}
    for path in uploaded_paths(uploaded):
        source = f"upload:{path.name}"
        if path.name != "adapter_config.json" and source not in have:
            rows.append([source, path.stem, 1.0])
    return rows


@user_errors
def push_to_hub(key: Optional[str], repo_id: str, token: str, private: bool) -> str:
    """Upload the merged adapter of this session's last merge; the token is used once and forgotten."""
    outcome = CACHE.get(key) if key else None
    if outcome is None:
        raise CoreMergeError("push: nothing to push yet (or the merge expired); click Merge & compare first")
    url = push_folder(outcome.adapter_folder, repo_id, token, private=bool(private))
    return f"Pushed to [{url}]({url}) ({'private' if private else 'public'})."


LIMITS_TEXT = (f"Limits per merge: at most {LIMITS.adapters} adapters, {LIMITS.prompts} prompts of up to "
               f"{LIMITS.prompt_chars} characters, answers of up to {LIMITS.new_tokens} new tokens, generated images "
               f"of up to {LIMITS.image_side} px and {LIMITS.steps} steps; sample images for classification come from "
               f"the preset; each merge at most {budgets.REQUEST_SECONDS:g} s, waiting included. " + UPLOAD_LIMITS)