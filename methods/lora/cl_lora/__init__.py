"""CL-LoRA: the strategy (``strategy.py``) and its shared and task-specific qkv adapters
(``adapter.py``). Importing the package registers ``cl-lora``.

Recipes, sources and deviations: docs/methods/lora.md
"""
from clbench.methods.lora.cl_lora.adapter import SharedLoRA, SpecificLoRA  # noqa: F401
from clbench.methods.lora.cl_lora.strategy import CLLoRA, CLLoRAConfig  # noqa: F401
