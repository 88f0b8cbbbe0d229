"""Layer 5, webapp: everything only the Gradio app needs.

Holds the request workflow (merge, explain, compare, package), the handlers that app.py wires to
components, the HTML rendering, the result cache, packaging (zip, model card, snippets), Hub push
and the Hub presets' availability check. May import every layer below: `comparison`, `merging`,
`formats`, `presets`, `bundled` and the shared modules.
"""
