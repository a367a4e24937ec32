"""Prompting shared by the prompt methods: ``injection`` puts prompt tokens and key/value prefixes
into timm's own ViT blocks and computes the query feature; ``strategy`` is the two-pass strategy
base (query pass, Adam, schedule, clipping). Methods import from here."""
from clbench.prompting.injection import (attention_with_prefix, check_promptable, prompt_blocks,
                                         prompted_tokens, query_features, split_prefix)
from clbench.prompting.strategy import IndexedItems, PromptConfig, PromptStrategy, QueryCache

__all__ = ["attention_with_prefix", "check_promptable", "prompt_blocks", "prompted_tokens",
           "query_features", "split_prefix", "IndexedItems", "PromptConfig", "PromptStrategy",
           "QueryCache"]
