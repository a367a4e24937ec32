"""InfLoRA and InfLoRA+CA: the strategies (``strategy.py``, ``ca.py``), the adapter with a
designed down-projection (``adapter.py``) and the GPM/DualGPM input-subspace memory
(``clbench.methods.lora.subspace``).

Importing the package registers ``inflora`` and ``inflora-ca``."""
from clbench.methods.lora.inflora.adapter import InfLoRAAdapter  # noqa: F401
from clbench.methods.lora.inflora.ca import InfLoRACA  # noqa: F401
from clbench.methods.lora.inflora.strategy import InfLoRA, InfLoRAConfig  # noqa: F401
