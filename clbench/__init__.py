"""clbench: a benchmark harness for class-incremental learning with pretrained ViTs."""
from pathlib import Path

_HOME = Path(__file__).resolve().parent


def check_same_tree(subpackage_init: str) -> None:
    """``methods/`` and ``benchmarks/`` install as ``clbench.methods``/``clbench.benchmarks``
    (a ``package-dir`` mapping). An editable install of one checkout still maps them when
    ``clbench`` itself is imported from another checkout (pytest run in a second clone), which
    would silently mix two trees' code: refuse that. Installed: ``clbench/<sub>/``; a checkout:
    ``<tree>/clbench/`` beside ``<tree>/<sub>/``."""
    folder = Path(subpackage_init).resolve().parent
    if folder.parent not in (_HOME, _HOME.parent):
        raise ImportError(
            f"clbench is imported from {_HOME} but {folder.name}/ from {folder}: two checkouts are "
            f"mixed (an editable install of the other one); run `pip install -e .` in the "
            f"checkout you are testing, or use its own virtual environment")
