"""Models and tasks of the bundled offline presets (trained by scripts/ on data that ships with Python packages)."""
