"""Held-out evaluation of a causal LM on chat conversations (used by ``fused-wce evaluate`` and ``compare``).

``measure``: per-conversation losses per role, turn index and ``needs_history`` label, loss-based context
dependence, and greedy-answer scores (:func:`~.measure.evaluate_conversations`); ``model_calls``: the forwards and
greedy generation it needs; ``intervals``: means over seeds with bootstrap 95% intervals over conversations and
paired differences; ``results``: the long-format ``results.csv`` rows; ``report``: the Markdown tables and
findings in words. Does not import trl.
"""
