"""SD-LoRA, SD-LoRA-RR and SD-LoRA-KD: the strategies (``strategy.py``) and the decoupled
low-rank adapter they install on every block's fused qkv (``adapter.py``).

Importing the package registers ``sdlora``, ``sdlora-rr`` and ``sdlora-kd``."""
from clbench.methods.lora.sdlora.adapter import DecoupledLoRA, SDLoRAQKV, least_squares_fit  # noqa: F401
from clbench.methods.lora.sdlora.strategy import (SDLoRA, SDLoRAConfig, SDLoRAKD, SDLoRARR,  # noqa: F401
                                             rank_for_task)
