"""tqdm progress per epoch, shown only on a terminal (quiet in logs and CI)."""
from __future__ import annotations

import sys

from avalanche.core import SupervisedPlugin

LOSS_EVERY = 25  # steps between loss readings shown on the bar


class ProgressPlugin(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.bar = None

    def before_training_epoch(self, strategy, **kwargs):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(strategy.dataloader), leave=False, disable=not sys.stderr.isatty(),
                        desc=f"task {strategy.task + 1} epoch {strategy.clock.train_exp_epochs + 1}")

    def after_training_iteration(self, strategy, **kwargs):
        if self.bar.disable:
            return
        self.bar.update(1)
        if self.bar.n % LOSS_EVERY == 0:  # reading the loss waits for the device: not every step
            self.bar.set_postfix(loss=f"{strategy.loss.item():.3f}", refresh=False)

    def after_training_epoch(self, strategy, **kwargs):
        self.bar.close()
