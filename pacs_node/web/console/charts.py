"""The dashboard's charts, drawn on the server as inline SVG (no script, nothing fetched).

A bar chart of one value per hour, with its largest value and the hours written
on it: what an admin reads at a glance (a quiet night, a burst at 9, latency
creeping up), legible without colour.
"""

from __future__ import annotations

from markupsafe import Markup, escape

WIDTH, HEIGHT = 480, 150
LEFT, BOTTOM, TOP = 44, 22, 14


def _number(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"


def bar_chart(values: list[float | None], hours: list[str], title: str,
              unit: str = "") -> Markup:
    """An accessible SVG bar chart: one bar per value (None: no bar), ``hours`` under it."""
    n = max(1, len(values))
    top = max([v for v in values if v is not None] or [0]) or 1
    plot_w, plot_h = WIDTH - LEFT - 4, HEIGHT - BOTTOM - TOP
    step = plot_w / n
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
             f"<title>{escape(title)}</title>",
             f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - 4}" y2="{TOP + plot_h}" '
             f'stroke="#888"/>',
             f'<text x="{LEFT - 4}" y="{TOP + 4}" text-anchor="end" font-size="10">'
             f'{escape(_number(top))}{escape(unit)}</text>',
             f'<text x="{LEFT - 4}" y="{TOP + plot_h}" text-anchor="end" font-size="10">0</text>']
    for i, value in enumerate(values):
        x = LEFT + i * step
        if value:
            h = plot_h * value / top
            parts.append(f'<rect x="{x + 1:.1f}" y="{TOP + plot_h - h:.1f}" '
                         f'width="{max(1.0, step - 2):.1f}" height="{h:.1f}" fill="#2f6db5">'
                         f"<title>{escape(hours[i])}: {escape(_number(value))}"
                         f"{escape(unit)}</title></rect>")
        if i % 6 == 0 or i == n - 1:
            anchor = "end" if i == n - 1 else "middle"
            parts.append(f'<text x="{x + step / 2:.1f}" y="{HEIGHT - 6}" '
                         f'text-anchor="{anchor}" font-size="10">{escape(hours[i])}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
