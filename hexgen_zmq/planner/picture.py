"""A picture of the plan as hand-written SVG: one row per region, a box per host, a square per GPU,
coloured by pipeline (hue) and stage (shade); unused GPUs grey."""

from __future__ import annotations

from html import escape
from pathlib import Path

from hexgen_zmq.planner.planning import PlanOutcome

CELL, GAP, PAD, HOST_GAP, ROW_H, LEGEND_ROW = 26, 4, 10, 14, 96, 18
LABEL_CHAR_W = 6.2  # width of one character of an 11 px host label


def _colour(pipeline: int, stage: int, stages: int) -> str:
    hue = (pipeline * 137.508) % 360
    light = 38 + (30 * stage / max(stages - 1, 1) if stages > 1 else 12)
    return f"hsl({hue:.0f},65%,{light:.0f}%)"


def render_svg(outcome: PlanOutcome) -> str:
    """The SVG document."""
    cluster = outcome.cluster
    owner: dict[tuple[str, int], tuple[int, int, int, str]] = {}
    for i, p in enumerate(outcome.pipelines):
        for j, st in enumerate(p.stages):
            for d in st.devices:
                owner[st.host.name, d] = (i, j, len(p.stages), st.id)
    parts: list[str] = []
    y, width = PAD, 0
    for region in cluster.regions:
        x = PAD
        parts.append(f'<text x="{x}" y="{y + 14}" font-weight="bold">{escape(region)}</text>')
        for host in (h for h in cluster.hosts if h.region == region):
            devices = sum(c for _, c in host.gpus)
            label = f"{host.name} ({', '.join(f'{c}x{g}' for g, c in host.gpus)})"
            w = 2 * PAD + max(devices * (CELL + GAP) - GAP, LABEL_CHAR_W * len(label))  # the label fits too
            parts.append(f'<rect x="{x}" y="{y + 22}" width="{w}" height="{ROW_H - 30}" rx="6" fill="#f4f4f4" stroke="#888"/>')
            parts.append(f'<text x="{x + PAD}" y="{y + 38}" font-size="11">{escape(label)}</text>')
            d = 0
            for gpu, count in host.gpus:
                for _ in range(count):
                    cx, cy = x + PAD + d * (CELL + GAP), y + 48
                    if (host.name, d) in owner:
                        i, j, n, sid = owner[host.name, d]
                        fill, text = _colour(i, j, n), sid
                    else:
                        fill, text = "#cccccc", "idle"
                    title = f"{host.name} cuda:{d} {gpu}: {text}"
                    parts.append(
                        f'<rect x="{cx}" y="{cy}" width="{CELL}" height="{CELL}" rx="3" fill="{fill}">'
                        f"<title>{escape(title)}</title></rect>"
                    )
                    parts.append(f'<text x="{cx + CELL / 2}" y="{cy + CELL / 2 + 3}" font-size="7" text-anchor="middle">{escape(text)}</text>')
                    d += 1
            x += w + HOST_GAP
        width = max(width, x)
        y += ROW_H
    for i, p in enumerate(outcome.pipelines):
        desc = " -> ".join(f"{st.host.name} {st.tp}x{st.gpu} [{st.layers[0]},{st.layers[1]})" for st in p.stages)
        parts.append(f'<rect x="{PAD}" y="{y}" width="12" height="12" fill="{_colour(i, 0, 1)}"/>')
        parts.append(
            f'<text x="{PAD + 18}" y="{y + 10}" font-size="11">{escape(p.id)}: {escape(desc)};'
            f" {p.capacity:.2f} req/s, {p.per_token_latency * 1000:.0f} ms/token</text>"
        )
        y += LEGEND_ROW
        width = max(width, PAD + 18 + 7 * (len(desc) + 40))
    w = outcome.workload
    summary = (
        f"{outcome.model.name}: {outcome.attainment:.1%} within {w.slo:g} s at {w.rate:g} req/s;"
        f" {outcome.target_attainment:.0%} up to {outcome.max_rate:.2f} req/s"
    )
    parts.append(f'<text x="{PAD}" y="{y + 14}" font-size="12">{escape(summary)}</text>')
    height = y + 24
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + PAD}" height="{height}" '
        f'font-family="sans-serif" font-size="12">\n<rect width="100%" height="100%" fill="white"/>\n'
        + "\n".join(parts)
        + "\n</svg>\n"
    )


def write_svg(path: str | Path, outcome: PlanOutcome) -> None:
    Path(path).write_text(render_svg(outcome))
