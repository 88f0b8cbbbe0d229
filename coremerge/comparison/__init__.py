"""Layer 4, comparison: running the base, each adapter and the merge side by side.

Holds the runners (one loaded model per preset, adapters switched on it), the text and
classification side by side (`side_by_side`), the per-task evaluation and quality benchmark
(`evaluation`), the image grid (`images`), the spectra and overlap insights and their plots, and
the limits of one comparison. May import: `merging`, `formats`, `presets`, `bundled` and the shared
modules.
"""
