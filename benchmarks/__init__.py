"""Built-in benchmarks, one module each; installed as ``clbench.benchmarks``."""
from clbench import check_same_tree

check_same_tree(__file__)
