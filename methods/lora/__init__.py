"""The LoRA family: SD-LoRA (``sdlora/``) and InfLoRA (``inflora/``) on the core's qkv-slice
adapters (``clbench.adapters``), with the input-subspace memory (``subspace``) that InfLoRA
designs its down-projections from.

Recipes, sources and deviations: docs/methods/lora.md
"""
