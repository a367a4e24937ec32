"""The LoRA family: SD-LoRA (``sdlora/``), InfLoRA (``inflora/``), CL-LoRA (``cl_lora/``) and
LoRA-Sub-DRS (``lora_sub_drs.py``) on the core's qkv-slice adapters (``clbench.adapters``), with
the input-subspace machinery (``subspace``) that InfLoRA designs its down-projections from and
LoRA-Sub-DRS projects its updates with.

Recipes, sources and deviations: docs/methods/lora.md
"""
