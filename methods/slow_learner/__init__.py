"""The slow-learner family: SLCA (``slca``) and SLCA++ (``slca_pp``). Sequential fine-tuning of
the backbone at a learning rate far below the head's, then classifier alignment from class
Gaussians (``clbench.alignment``) after every task; ``base`` holds what both share.

Recipes, sources and deviations: docs/methods/slow_learner.md
"""
