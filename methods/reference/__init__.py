"""Reference points: sequential fine-tuning (lower bound), linear probe, joint training (upper
bound, never ranked).

Recipes, sources and deviations: docs/methods/reference.md
"""
