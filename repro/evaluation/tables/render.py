"""Number formatting and the three renderers of a table grid: markdown, LaTeX (booktabs), CSV.

Paper values are printed exactly as stored; ours with 2 decimals (3 significant digits when |x| < 1); Δ with 2
decimals and an explicit sign.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any, Iterable


def _fmt_ours(x: float) -> str:
    """Our value: 2 decimals, or 3 significant digits when |x| < 1."""
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0.00"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:#.3g}"


def _fmt_delta(d: float) -> str:
    """A difference with explicit sign: 2 decimals (2 significant digits if it would print as 0.00)."""
    d = round(float(d), 12)
    if not math.isfinite(d):
        return str(d)
    if d == 0:
        return "+0.00"
    if abs(d) >= 0.005:
        return f"{d:+.2f}"
    return f"{d:+#.2g}"


def _num_repr(x: float) -> str:
    """Machine-readable number for csv (shortest repr, float noise rounded away)."""
    x = round(float(x), 10)
    return repr(x)


@dataclass
class _Grid:
    title: str
    header: list[str]
    align: list[str]  # "l" or "r" per column
    body: list[tuple[str, list[str], bool]] = field(default_factory=list)  # (kind, cells, bold)
    preamble: list[str] = field(default_factory=list)  # lines between the title and the table
    notes: list[str] = field(default_factory=list)  # lines under the table


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|")


def _grid_md(grid: _Grid, level: int = 3) -> str:
    lines = [f"{'#' * level} {grid.title}"]
    if grid.preamble:
        lines += [""] + grid.preamble
    lines.append("")
    lines.append("| " + " | ".join(_md_cell(h) for h in grid.header) + " |")
    lines.append("|" + "|".join("---:" if a == "r" else "---" for a in grid.align) + "|")
    for kind, cells, bold in grid.body:
        if kind == "group":
            cells = [f"*{cells[0]}*"] + [""] * (len(grid.header) - 1)
        elif bold:
            cells = [f"**{cells[0]}**"] + cells[1:]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    if grid.notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in grid.notes]
    return "\n".join(lines)


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


_LATEX_UNICODE = {
    "–": "--", "—": "---", "Δ": r"$\Delta$", "²": r"$^{2}$", "†": r"$^{\dagger}$",
    "‡": r"$^{\ddagger}$", "×": r"$\times$", "−": r"$-$", "≈": r"$\approx$", "…": r"\dots{}",
    "±": r"$\pm$", "é": r"\'e", "“": "``", "”": "''",
}


def _tex(s: str) -> str:
    """Escape text for LaTeX (special characters and the few non-ASCII symbols we print)."""
    out = []
    for ch in s:
        out.append(_LATEX_SPECIAL.get(ch) or _LATEX_UNICODE.get(ch) or ch)
    text = "".join(out)
    # `code` spans from the markdown notes become \texttt{...}
    parts = text.split("`")
    if len(parts) > 1 and len(parts) % 2 == 1:
        text = "".join(p if i % 2 == 0 else r"\texttt{" + p + "}" for i, p in enumerate(parts))
    return text


def _grid_latex(grid: _Grid) -> str:
    n = len(grid.header)
    lines = [
        f"% {grid.title}",
        r"\begin{table}[htbp]",
        r"\centering",
        r"\caption{" + _tex(grid.title) + "}",
        r"\begin{tabular}{" + "".join(grid.align) + "}",
        r"\toprule",
        " & ".join(_tex(h) for h in grid.header) + r" \\",
        r"\midrule",
    ]
    for kind, cells, bold in grid.body:
        if kind == "group":
            lines.append(rf"\multicolumn{{{n}}}{{l}}{{\textit{{{_tex(cells[0])}}}}} \\")
            continue
        tex_cells = [_tex(c) for c in cells]
        if bold:
            tex_cells[0] = r"\textbf{" + tex_cells[0] + "}"
        lines.append(" & ".join(tex_cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    extra = list(grid.preamble) + [f"Note: {n_}" for n_ in grid.notes]
    if extra:
        lines.append(r"\par\smallskip")
        lines.append(r"{\footnotesize " + r" \\ ".join(_tex(x) for x in extra) + "}")
    lines.append(r"\end{table}")
    return "\n".join(lines)


def _csv_text(header: list[str], rows: Iterable[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue().rstrip("\n")
