"""The Markdown of an evaluation: tables of cells (mean over seeds and its bootstrap 95% interval) and findings in
words: whether the model uses the history, and which differences between models are outside the noise."""
from __future__ import annotations

import math

from .intervals import difference, estimate
from .measure import TURNS
from .results import difference_row

HISTORY_TURNS = "needs_history turns"
OTHER_TURNS = "other assistant turns"

# (title, explanation, [(metric, group, column header), ...]); columns nobody measured are left out.
TABLES = (
    ("Held-out loss", "Mean cross-entropy (nats) of the tokens of each group; lower is better.",
     [("loss", "history/needed", HISTORY_TURNS), ("loss", "history/not_needed", OTHER_TURNS),
      ("loss", "role/assistant", "all assistant"), ("loss", "role/user", "user"),
      ("loss", "full_sequence", "full sequence")]),
    ("Held-out loss per assistant turn", "The k-th assistant message of each conversation (nats).",
     [("loss", f"turn/{turn}", turn) for turn in TURNS]),
    ("Context dependence", "Loss of an assistant message without the history (system prompt and its own exchange "
     "only) minus with it, in nats: > 0 means the model uses the earlier turns.",
     [("context_dependence", "history/needed", HISTORY_TURNS), ("context_dependence", "history/not_needed",
                                                               OTHER_TURNS)]
     + [("context_dependence", f"turn/{turn}", turn) for turn in TURNS[1:]]),
    ("Greedy answers", "Share of greedy replies that equal the reference reply (exact) or contain the expected fact "
     "(contains); the control removes the history first (what can be guessed without it).",
     [("answer_exact", "history/needed", f"exact, {HISTORY_TURNS}"),
      ("answer_contains", "history/needed", f"contains, {HISTORY_TURNS}"),
      ("answer_contains_without_history", "history/needed", f"contains without history, {HISTORY_TURNS}"),
      ("answer_exact", "history/not_needed", f"exact, {OTHER_TURNS}"),
      ("answer_contains", "history/not_needed", f"contains, {OTHER_TURNS}")]),
)

# The cells the findings compare between models: (metric, group, what it is in words).
KEY_CELLS = (
    ("loss", "history/needed", f"loss on {HISTORY_TURNS}"),
    ("loss", "history/not_needed", f"loss on {OTHER_TURNS}"),
    ("loss", "role/assistant", "loss on assistant turns"),
    ("loss", "role/user", "loss on user turns"),
    ("context_dependence", "history/needed", f"context dependence on {HISTORY_TURNS}"),
    ("answer_exact", "history/needed", f"exact answers on {HISTORY_TURNS}"),
    ("answer_contains", "history/needed", f"answers containing the fact on {HISTORY_TURNS}"),
)


def number(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "-"


def interval_text(cell, signed: bool = False) -> str:
    """``0.812 [0.781, 0.846]`` (``+0.812 ...`` when ``signed``)."""
    if not math.isfinite(cell.value):
        return "-"
    value = f"{cell.value:+.3f}" if signed else f"{cell.value:.3f}"
    return f"{value} [{number(cell.low)}, {number(cell.high)}]"


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


def _measured(models: dict, metric: str, group: str) -> bool:
    return any((metric, group) in run.sums for runs in models.values() for run in runs)


def tables(models: dict, counts) -> list[str]:
    """One Markdown table per :data:`TABLES` entry: a row per model (``{name: [Measurements per seed]}``)."""
    lines = []
    first = next(iter(models.values()))[0]
    for title, explanation, columns in TABLES:
        columns = [column for column in columns if _measured(models, column[0], column[1])]
        if not columns:
            continue
        body = [[name] + [interval_text(estimate(runs, metric, group, counts)) for metric, group, _ in columns]
                for name, runs in models.items()]
        sizes = ", ".join(f"{header} {first.total(metric, group)[1]}" for metric, group, header in columns)
        lines += [f"## {title}", "", f"{explanation} Mean [95% interval]; messages per column: {sizes}.", "",
                  markdown_table(["model"] + [header for *_, header in columns], body), ""]
    return lines


def _noise_words(cell) -> str:
    if cell.outside_noise:
        return "outside the noise"
    return "within the noise (seeds disagree)" if cell.low > 0 or cell.high < 0 else "within the noise"


def history_findings(name: str, runs: list, counts) -> list[str]:
    """Whether model ``name`` uses the history, in words: context dependence on needs_history turns against the
    other turns, and answers with against without the history. Empty when the data has no labels."""
    needed, other = ("context_dependence", "history/needed"), ("context_dependence", "history/not_needed")
    if not _measured({name: runs}, *needed):
        return []
    lines = []
    on_needed, on_other = estimate(runs, *needed, counts), estimate(runs, *other, counts)
    gap = difference(runs, needed, runs, other, counts)
    uses = on_needed.low > 0 and gap.outside_noise and gap.value > 0
    lines.append(f"- `{name}`: context dependence {interval_text(on_needed)} nats on {HISTORY_TURNS}, "
                 f"{interval_text(on_other)} on {OTHER_TURNS}; difference {interval_text(gap, True)}, "
                 f"{_noise_words(gap)}: "
                 + ("the model uses the history where it is needed." if uses else
                    "no sign that the model uses the history more where it is needed."))
    with_history = ("answer_contains", "history/needed")
    without = ("answer_contains_without_history", "history/needed")
    if _measured({name: runs}, *with_history):
        gain = difference(runs, with_history, runs, without, counts)
        lines.append(f"- `{name}`: greedy answers contain the expected fact on "
                     f"{interval_text(estimate(runs, *with_history, counts))} of {HISTORY_TURNS} with the history, "
                     f"{interval_text(estimate(runs, *without, counts))} without it; difference "
                     f"{interval_text(gain, True)}, {_noise_words(gain)}.")
    return lines


def comparison_findings(models: dict, counts) -> tuple[list[str], list[dict]]:
    """Every later model against every earlier one (``{name: [Measurements per seed]}``, in report order) on the
    :data:`KEY_CELLS`: one line per pair naming the differences outside the noise and those within it; and the
    ``differences.csv`` rows."""
    names = list(models)
    cells = [cell for cell in KEY_CELLS if _measured(models, cell[0], cell[1])]
    lines, rows, outside, total = [], [], 0, 0
    for j, name in enumerate(names):
        for baseline in names[:j]:
            found = {True: [], False: []}
            for metric, group, words in cells:
                cell = difference(models[name], (metric, group), models[baseline], (metric, group), counts)
                if not math.isfinite(cell.value):
                    continue
                rows.append(difference_row(name, baseline, metric, group, cell))
                disagree = "" if cell.outside_noise or not (cell.low > 0 or cell.high < 0) else " (seeds disagree)"
                found[cell.outside_noise].append(f"{words} {interval_text(cell, True)}{disagree}")
            outside, total = outside + len(found[True]), total + len(found[True]) + len(found[False])
            parts = [f"outside the noise: {'; '.join(found[True])}." if found[True] else
                     "no difference outside the noise."]
            parts += [f"Within the noise: {'; '.join(found[False])}."] if found[False] else []
            lines.append(f"- `{name}` - `{baseline}`: " + " ".join(parts))
    if total:
        lines.append(f"- In all, {outside} of {total} differences are outside the noise.")
    return lines, rows


def noise_note(seeds: int | None, conversations: int) -> str:
    """How to read the intervals, given the number of seeds (None: one model, no training) and of held-out
    conversations."""
    text = f"Intervals: bootstrap 95% over the {conversations} held-out conversations"
    if seeds is None:
        return text + "."
    if seeds == 1:
        return (text + " (resampled together for every model, so differences are paired); one seed, so how much "
                "results move with the seed is not measured; a difference is outside the noise when its interval "
                "excludes 0.")
    return (text + f" (resampled together for every model, so differences are paired); values are the mean over "
            f"{seeds} seeds; a difference is outside the noise when its interval excludes 0 and every seed's "
            "difference has the same sign.")
