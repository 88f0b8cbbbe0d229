"""Layer 2, merging: the math and its driver.

Holds the linear algebra (`linalg`), the method registry (`methods`), the spaces a module is merged
in (`spaces`: core, full, knots), the merge options (`options`), the module-by-module merge (`merge`)
and `merge_to_folder` (`to_folder`), which the CLI and the app call. May import: `formats` and the
shared modules.
"""
