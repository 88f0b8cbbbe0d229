"""coremerge's Gradio app: UI wiring only; the handlers live in coremerge.webapp.handlers."""

import spaces  # noqa: F401  - must come before torch on ZeroGPU

import os  # noqa: E402

import gradio as gr  # noqa: E402

from coremerge.comparison.plots import CAPTIONS  # noqa: E402
from coremerge.merging.methods import METHODS  # noqa: E402
from coremerge.merging.options import SPACES  # noqa: E402
from coremerge.presets import find_preset  # noqa: E402
from coremerge.webapp import handlers, method_comparison  # noqa: E402
from coremerge.webapp.housekeeping import remove_on_signals  # noqa: E402
from coremerge.webapp.render import RANK_COLUMNS  # noqa: E402

# The Space maps visitors' LoRA key layouts in-process (diffusers is loaded for the image grids anyway) and keeps
# none of them on its disk (coremerge.formats.key_map_cache).
os.environ.setdefault("COREMERGE_CACHE", "off")

TITLE = "coremerge: merge LoRA adapters in Core Space"
INTRO = ("Merge several LoRA adapters of one base model into one with **Core Space merging** "
         "([Panariello et al., NeurIPS 2025](https://arxiv.org/abs/2509.17786)), and see the base model, every "
         "adapter and the merge side by side. Pick a preset or edit the adapter list (Hub IDs or paths).")


def build_app() -> gr.Blocks:
    start_preset = handlers.default_preset()
    start_rows, start_description, start_base, start_prompts, uses_prompts = handlers.preset_view(start_preset)
    start = find_preset(start_preset).merge
    start_alpha, start_params, start_where = handlers.method_settings(start.method, start_preset)
    with gr.Blocks(title="coremerge", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        with gr.Row():
            with gr.Column(scale=3):
                preset = gr.Dropdown(handlers.preset_choices(), value=start_preset, label="Preset")
                description = gr.Markdown(start_description)
                adapters = gr.Dataframe(
                    value=start_rows, headers=handlers.ADAPTER_COLUMNS, datatype=["str", "str", "str"],
                    type="array", interactive=True, label="Adapters (one row each; add or remove rows; an empty weight is 1)",
                    column_count=(3, "fixed"), row_count=(len(start_rows), "dynamic"),
                )
                with gr.Row():
                    uploaded = gr.File(file_count="multiple", file_types=[".safetensors", ".json", ".zip"],
                                       label=handlers.UPLOAD_LABEL, elem_id="uploads", scale=3)
                    hub_token = gr.Textbox(label="Hub read token (optional)", type="password", elem_id="hub-token",
                                           info=handlers.TOKEN_INFO, scale=2)
                base_model = gr.Markdown(start_base)
                prompts = gr.Textbox(start_prompts, visible=uses_prompts, lines=4, label="Prompts (one per line; \\n = newline)")
            with gr.Column(scale=2):
                method = gr.Dropdown([(m.display_name, m.name) for m in METHODS.values()], value=start.method,
                                     label="Method", elem_id="method")
                method_text = gr.Markdown(f"{handlers.method_info(start.method)}\n\n{start_where}",
                                          elem_id="method-text")
                space = gr.Radio(list(SPACES), value=start.space, label="Space",
                                 info="core: exact for TA / TSV / Iso-C and far faster; full and knots are baselines")
                alpha = gr.Slider(0.05, 3.0, value=start_alpha, step=0.05,
                                  label="alpha (global scale of the merged update)", elem_id="alpha")
                with gr.Accordion("Advanced", open=False):
                    isotropize = gr.Checkbox(False, label="Isotropize (flatten the merged spectrum)")
                    rank = gr.Number(None, precision=0, minimum=0, label="Rank of the written adapter (empty = exact)")
                    parameters = [
                        gr.Number(start_params.get(p.name, p.default), label=f"{p.name.replace('_', ' ')}: {p.help}",
                                  minimum=p.low, maximum=p.high, precision=0 if p.kind is int else None,
                                  visible=p.name in start_params, elem_id=f"parameter-{p.name.replace('_', '-')}")
                        for p in handlers.PARAMETERS
                    ]
                go = gr.Button("Merge & compare", variant="primary", elem_id="merge-button")
                compare_all = gr.Button("Compare methods (every method, core and full space)",
                                        elem_id="compare-methods")
                gr.Markdown(handlers.LIMITS_TEXT)

        summary = gr.Markdown(elem_id="summary")
        with gr.Tab("Side by side"):
            comparison = gr.HTML(elem_id="comparison")
            accuracy = gr.Plot(label="Per-task accuracy", show_label=False, visible=False)
            accuracy_caption = gr.Markdown(f"*{CAPTIONS['accuracy']}*", visible=False, elem_classes="cm-caption")
        with gr.Tab("Compare methods"):
            methods_summary = gr.Markdown(elem_id="methods-summary")
            methods_table = gr.Dataframe(headers=method_comparison.COLUMNS, label="Every method at its tuned settings",
                                         interactive=False, elem_id="methods-table")
            methods_chart = gr.Plot(label="Quality, merge time, output rank and size per method",
                                    elem_id="methods-chart")
        with gr.Tab("Merge report"):
            report = gr.Markdown(elem_id="report")
            with gr.Row():
                with gr.Column(min_width=320):
                    spectra = gr.Plot(label="Singular value spectra", show_label=False)
                    gr.Markdown(f"*{CAPTIONS['spectra']}*", elem_classes="cm-caption")
                with gr.Column(min_width=320):
                    overlap = gr.Plot(label="Subspace overlap", show_label=False)
                    gr.Markdown(f"*{CAPTIONS['overlap']}*", elem_classes="cm-caption")
            ranks = gr.Dataframe(headers=RANK_COLUMNS, label="Ranks per module", interactive=False, wrap=True,
                                 column_widths=["30%", "12%", "46%", "12%"], elem_id="ranks")
        with gr.Tab("Download & share"):
            download = gr.File(label="Merged adapter (peft folder, merge_report.json, model card)")
            snippet = gr.Code(language="python", label="Use it in code")
            with gr.Group():
                repo = gr.Textbox(label="Hub repository (owner/name)", placeholder="my-name/merged-lora")
                token = gr.Textbox(label="Hub token (write access; used once, never stored)", type="password")
                private = gr.Checkbox(True, label="Private repository")
                push = gr.Button("Push to the Hub")
                pushed = gr.Markdown()
        last_merge = gr.State(None)

        preset.change(handlers.show_preset, preset, [adapters, description, base_model, prompts, method, space, alpha]
                      ).then(handlers.show_method, [method, preset, space], [method_text, alpha, *parameters],
                             api_name="preset_method_settings", api_visibility="private")
        uploaded.upload(handlers.add_upload_rows, [uploaded, adapters], adapters)
        method.change(handlers.show_method, [method, preset, space], [method_text, alpha, *parameters],
                      api_name="show_method")
        go.click(
            handlers.merge_and_compare,
            [preset, adapters, method, space, alpha, isotropize, rank, prompts, hub_token, uploaded, *parameters],
            [summary, comparison, accuracy, report, ranks, spectra, overlap, download, snippet, last_merge],
            concurrency_limit=4, concurrency_id="merge",  # checks run at once; merges take budget.MERGE_SLOT
        )
        compare_all.click(
            method_comparison.compare_methods_button, [preset, adapters, prompts, hub_token, uploaded],
            [methods_summary, methods_table, methods_chart], concurrency_limit=1, concurrency_id="compare-methods",
        )
        accuracy.change(lambda plot: gr.update(visible=plot is not None), accuracy, accuracy_caption,
                        api_visibility="private")  # the caption goes with its chart
        push.click(handlers.push_to_hub, [last_merge, repo, token, private], pushed, concurrency_limit=2)
    demo.queue(max_size=32)
    return demo


demo = build_app()
handlers.warm_up_in_background(handlers.default_preset())

if __name__ == "__main__":
    remove_on_signals(handlers.CACHE.root)  # and at normal exit (housekeeping.remove_at_exit)
    demo.launch(theme=gr.themes.Soft())
