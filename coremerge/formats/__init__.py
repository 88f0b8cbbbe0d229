"""Layer 1, formats: reading and writing every LoRA format.

Holds the sources (Hub ID, folder, file), the canonical adapter (`Adapter`, `TaskFactors`,
`MergedModule`), the compatibility checks, peft LoRA (with rsLoRA, patterns and MoSLoRA), the
Stable Diffusion families (kohya / A1111 / diffusers files), Flux.1 and SD3, the cache of how
diffusers maps a file's keys (`key_map_cache`), and the exports (peft folder, diffusers file).
May import: `coremerge.errors` and `coremerge.version` only.
"""
