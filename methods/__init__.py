"""Built-in methods, one folder per family (``lora``, ``prompt``, ``prototype``, ``reference``);
installed as ``clbench.methods``."""
from clbench import check_same_tree

check_same_tree(__file__)
