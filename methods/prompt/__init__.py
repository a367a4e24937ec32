"""The prompt family: L2P, L2P++, CODA-Prompt, DualPrompt, HiDe-Prompt. ``injection`` puts prompt
tokens and key/value prefixes into timm's own ViT blocks and computes the query feature; ``base``
is the family's two-pass strategy base (query pass, Adam, schedule, clipping). Methods import
from here.

Recipes, sources and deviations: docs/methods/prompt.md
"""
from clbench.methods.prompt.base import IndexedItems, PromptConfig, PromptStrategy, QueryCache
from clbench.methods.prompt.injection import (attention_with_prefix, check_promptable, prompt_blocks,
                                              prompted_tokens, query_features, split_prefix)

__all__ = ["attention_with_prefix", "check_promptable", "prompt_blocks", "prompted_tokens",
           "query_features", "split_prefix", "IndexedItems", "PromptConfig", "PromptStrategy",
           "QueryCache"]
