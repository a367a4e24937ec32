"""Shared fixtures: a tiny checkpoint of the letters architecture for runs that must not depend
on the shipped weights, and a helper that runs the CLI in-process."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Random-init weights of the `vit-tiny-letters` architecture, saved as .safetensors."""
    import timm
    from safetensors.torch import save_file

    from clbench.backbones import BACKBONES

    spec = BACKBONES["vit-tiny-letters"]
    model = timm.create_model(spec.tag, pretrained=False, num_classes=52, **spec.model_kwargs)
    path = tmp_path_factory.mktemp("ckpt") / "letters-random.safetensors"
    save_file(model.state_dict(), str(path))
    return path


@pytest.fixture
def cli(capsys):
    """Run ``clbench`` in-process; returns (exit code, stdout, stderr)."""
    from clbench.cli import main

    def invoke(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread; more only wait at OpenMP barriers on a busy CPU.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def float64():
    """Float64 as the default dtype for a parity test against a reference, restored after."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)
