"""The package version, in one place (the merge report and the model card name it)."""

__version__ = "0.1.0"
