"""Rendering conversations with a chat template and comparing renderings: :class:`ChatTemplate`."""
from __future__ import annotations

import re


class ChatTemplate:
    """Renders conversations with one chat template (and tools / template kwargs) and compares renderings.

    :meth:`render` is ``tokenizer.apply_chat_template(..., tokenize=False)``. :meth:`render_prepared` renders
    messages :meth:`prepare` d once straight with the compiled template, as ``apply_chat_template`` does after
    preparing its input (keys whose value is None dropped, plain data, reasoning aliases): about a third of the
    time for the short conversations span finding renders by the thousand. Its caller checks it against
    :meth:`render` on the whole conversation before relying on it.

    Comparisons never end inside an added token (``<|im_end|>`` and ``<|im_start|>`` share ``<|``): a common
    prefix that would split one is shortened to the token's start.
    """

    def __init__(self, tokenizer, tools, chat_template, template_kwargs):
        self.tokenizer, self.tools, self.chat_template = tokenizer, tools, chat_template
        self.kwargs = dict(template_kwargs or {})
        added = getattr(tokenizer, "added_tokens_decoder", {}).values()
        self.atomic = sorted({token.content for token in added if len(token.content) > 1}, key=len, reverse=True)
        special = {token.content for token in added if token.special} | set(tokenizer.all_special_tokens)
        special = sorted((token for token in special if token), key=len, reverse=True)
        self.special = re.compile("|".join(map(re.escape, special))) if special else None
        self.special_tokens = special
        self.longest_atomic = max(map(len, self.atomic), default=0)
        self._atomic_rank = {token: rank for rank, token in enumerate(self.atomic)}
        self._atomic_pairs = {token[at:at + 2] for token in self.atomic for at in range(len(token) - 1)}
        self._atomic_starts = (re.compile("(?=(" + "|".join(map(re.escape, self.atomic)) + "))") if self.atomic
                               else None)
        self._compiled = None  # (compiled template, its context, helpers) once built; False: unavailable

    def source(self):
        """The template's text (a dict of named templates as the tokenizer holds them)."""
        return self.chat_template if self.chat_template is not None else getattr(self.tokenizer, "chat_template", None)

    def render(self, messages, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=self.tools, chat_template=self.chat_template, tokenize=False,
            add_generation_prompt=add_generation_prompt, **self.kwargs)

    def render_or_none(self, messages, add_generation_prompt: bool = False) -> str | None:
        """:meth:`render`, or ``None`` where the template refuses the conversation: a template may refuse a prefix
        ("must end with the assistant", "tools need a user message") or a traced field."""
        try:
            return self.render(messages, add_generation_prompt=add_generation_prompt)
        except Exception:  # noqa: BLE001 - any refusal of the template; such renderings are not used
            return None

    def _direct(self):
        """What :meth:`render_prepared` needs, built from transformers' own chat-template helpers; None when this
        transformers version does not have them."""
        if self._compiled is None:
            try:
                from transformers.utils import chat_template_utils as helpers

                source = self.tokenizer.get_chat_template(self.chat_template, self.tools)
                tools = None if self.tools is None else [
                    tool if isinstance(tool, dict) else helpers.get_json_schema(tool) for tool in self.tools]
                variables = helpers._plain_template_data({**self.tokenizer.special_tokens_map, **self.kwargs})
                compiled = helpers._compile_jinja_template(source)
                # What Template.render(messages=..., tools=..., documents=None, add_generation_prompt=...,
                # **variables) puts in the template's context, less the two that change from call to call.
                context = {**compiled.globals, "tools": helpers._plain_template_data(tools), "documents": None,
                           **variables}
                self._compiled = (compiled, context, helpers._plain_template_data, helpers._alias_reasoning_fields)
            except Exception:  # noqa: BLE001 - any missing helper: render through apply_chat_template only
                self._compiled = False
        return self._compiled or None

    def prepare(self, messages: list[dict]) -> list[dict] | None:
        """``messages`` as ``apply_chat_template`` hands them to the template, for :meth:`render_prepared` (None when
        this transformers version lacks the helpers)."""
        direct = self._direct()
        if direct is None:
            return None
        *_, plain, alias = direct
        return alias([plain({key: value for key, value in message.items() if value is not None})
                      for message in messages])

    def render_prepared(self, prepared: list[dict], add_generation_prompt: bool = False) -> str | None:
        """The rendering of :meth:`prepare` d messages, or None where the template refuses them."""
        compiled, context, *_ = self._direct()
        try:  # Template.render without its copies of the context: it is built once, and the template cannot
            # change it (the sandbox is immutable)
            context = compiled.new_context(
                {**context, "messages": prepared, "add_generation_prompt": add_generation_prompt}, shared=True)
            return "".join(compiled.root_render_func(context))
        except Exception:  # noqa: BLE001 - a refusal, as in render_or_none
            return None

    def _snap(self, text: str, k: int) -> int:
        """The largest position <= k of ``text`` that does not lie strictly inside an added token: while one
        does (the first such token in :attr:`atomic`, longest first), k moves to its start."""
        # A token around k holds the two characters at k - 1 and k: most positions are ruled out at once.
        while 0 < k < len(text) and text[k - 1:k + 1] in self._atomic_pairs:
            # At each start before k the longest added token there (the alternatives are longest first)
            straddling = [(self._atomic_rank[match.group(1)], match.start()) for match in self._atomic_starts.finditer(
                text, max(0, k - self.longest_atomic + 1), k + self.longest_atomic - 1)
                if match.start() < k < match.start() + len(match.group(1))]
            if not straddling:
                return k
            k = min(straddling)[1]  # the earliest occurrence of the first token in `atomic` order
        return k

    def common_prefix_at(self, a: str, text: str, start: int) -> int:
        """:meth:`common_prefix` of ``a`` and ``text[start:]``, reading no more of ``text`` than it needs."""
        return self.common_prefix(a, text[start:start + len(a) + self.longest_atomic])

    def common_prefix(self, a: str, b: str) -> int:
        """Length of the common prefix of ``a`` and ``b``, cut back to the start of any added token it splits."""
        k = common_length(a, b)
        while True:
            snapped = self._snap(b, self._snap(a, k))
            if snapped == k:
                return k
            k = snapped

    def through_first_special(self, text: str) -> int:
        """Length of ``text`` up to and including its first special token (all of it, less trailing whitespace,
        when it has none): the end-of-turn part of a non-assistant message's trailer."""
        match = self.special.search(text) if self.special is not None else None
        return match.end() if match else len(text.rstrip())



def common_length(a: str, b: str) -> int:
    """Length of the common prefix of ``a`` and ``b`` (bisection over slice comparisons, not a loop over
    characters)."""
    low, high = 0, min(len(a), len(b))
    if a[:high] == b[:high]:
        return high
    while high - low > 1:  # a[:low] == b[:low], a[:high] != b[:high]
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low
