"""Overlapping text in a rendered matplotlib figure (titles, labels, tick labels, cell values)."""

from __future__ import annotations


def _drawn_ticks(axis) -> list:
    """The tick labels matplotlib draws: those of ticks inside the axis' view limits (the
    locator also places ticks beyond them, whose labels are kept but never drawn)."""
    low, high = sorted(axis.get_view_interval())
    span = high - low
    return [
        tick.label1
        for tick in axis.get_major_ticks()
        if low - 1e-9 * span <= tick.get_loc() <= high + 1e-9 * span
    ]


def _texts(fig, renderer):
    found = []
    if fig._suptitle is not None and fig._suptitle.get_text():
        found.append(("suptitle", fig._suptitle, None))
    for ax in fig.axes:
        for kind, t in (("title", ax.title), ("title", ax._left_title), ("title", ax._right_title),
                        ("xlabel", ax.xaxis.label), ("ylabel", ax.yaxis.label)):  # fmt: skip
            found.append((kind, t, ax))
        found += [("tick", t, ax) for t in _drawn_ticks(ax.xaxis) + _drawn_ticks(ax.yaxis)]
    return [
        (kind, t.get_text(), t.get_window_extent(renderer), ax)
        for kind, t, ax in found
        if t.get_visible() and t.get_text().strip()
    ]


def _overlap(a, b, slack: float = 1.0) -> bool:
    return (min(a.x1, b.x1) - max(a.x0, b.x0) > slack) and (
        min(a.y1, b.y1) - max(a.y0, b.y0) > slack
    )


def text_problems(fig) -> list[str]:
    """Pairs of texts that overlap, titles that run over another axes (a colour bar, a
    neighbouring panel), and text cut off at the figure's edge."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = _texts(fig, renderer)
    frame = fig.bbox
    problems = []
    for i, (kind, text, box, ax) in enumerate(texts):
        if (
            box.x0 < frame.x0 - 1
            or box.x1 > frame.x1 + 1
            or box.y0 < frame.y0 - 1
            or box.y1 > frame.y1 + 1
        ):
            problems.append(f"{kind} {text!r} is cut off at the figure's edge")
        for kind2, text2, box2, _ in texts[i + 1 :]:
            if _overlap(box, box2):
                problems.append(f"{kind} {text!r} overlaps {kind2} {text2!r}")
        if kind in ("title", "suptitle"):
            for other in fig.axes:
                if other is not ax and _overlap(box, other.get_window_extent(renderer)):
                    problems.append(f"{kind} {text!r} runs over another axes")
    return problems
