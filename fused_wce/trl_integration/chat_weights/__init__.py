"""Per-token loss weights from chat conversations.

``turn_weighting``: :class:`TurnWeighting`, one weight per message; ``adaptive``: per-turn multipliers that follow
the running loss; ``rendering``: rendering conversations with a chat template; ``template_spans``: which
characters of a chat template's rendering belong to which message;
``tokenize``: :func:`tokenize_with_weights`, a weight, role and turn code per token; ``messages``: validation of
chat messages and weights. Does not import trl (the adaptive state imports torch when it builds tensors).
"""
