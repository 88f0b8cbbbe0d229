"""Layer 3, bundled: the models and tasks of the bundled offline presets.

Trained by scripts/ on data that ships with Python packages; the comparison layer runs them.
May import: the shared modules only (and `bundled` itself).
"""
