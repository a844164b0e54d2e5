"""``--explain N``: an HTML page per document showing which source tokens the pyramid kept.

Each top-k reports, per kept slot, the original token position that dominates it
(``PoolingInfo.source_positions``). A token's *stage reached* is the number of poolings it survived as a
dominant position: 0 = dropped by the first top-k, S = present in the encoder output (S poolings). Its
*score* is the last rating a scorer gave to the slot it dominated (the pooled score when it survived
every stage). Every source token is one ``<span class="tok s{stage}">`` shaded by stage, with the stage
and score in ``data-`` attributes and the tooltip.
"""

from __future__ import annotations

import html
from pathlib import Path

import torch

PALETTE = "255, 140, 0"  # orange; opacity grows with the stage reached


def token_survival(pooling, width: int) -> tuple[list[int], list[float]]:
    """(stage reached, last score) for positions 0..width-1 of source row 0 of an EncoderOut's pooling."""
    stage = [0] * width
    score = [float("nan")] * width
    slot_positions = torch.arange(width)
    for j, info in enumerate(pooling):
        rated = info.input_scores[0].float().cpu()
        for slot, position in enumerate(slot_positions.tolist()):
            if position < width and slot < rated.numel():
                score[position] = float(rated[slot])
        kept = info.source_positions[0].cpu()
        real = info.mask[0].cpu()
        for slot, position in enumerate(kept.tolist()):
            if real[slot] and position < width:
                stage[position] = j + 1
                score[position] = float(info.pooled_scores[0, slot])
        slot_positions = kept
    return stage, score


def render_page(
    pieces: list[str],
    stage: list[int],
    score: list[float],
    num_stages: int,
    *,
    title: str,
    hypothesis: str,
    reference: str | None,
) -> str:
    """A self-contained HTML page: legend, hypothesis (and reference), then the shaded source."""

    def shade(s: int) -> str:
        return f"rgba({PALETTE}, {0.08 + 0.92 * s / max(1, num_stages):.3f})"

    legend = " ".join(
        f'<i class="legend s{s}" style="background:{shade(s)}">stage {s}</i>' for s in range(num_stages + 1)
    )
    spans = []
    for piece, s, sc in zip(pieces, stage, score, strict=True):
        text = html.escape(piece.replace("\u2581", " "))
        shown = "n/a" if sc != sc else f"{sc:.3f}"
        spans.append(
            f'<span class="tok s{s}" data-stage="{s}" data-score="{shown}" '
            f'style="background:{shade(s)}" title="stage {s}, score {shown}">{text}</span>'
        )
    reference_html = f"<h2>Reference</h2>\n<p>{html.escape(reference)}</p>\n" if reference else ""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.6}"
        ".src{white-space:pre-wrap}.tok{border-radius:2px}i.legend{font-style:normal;padding:0 .4em}</style>\n"
        "</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n"
        f"<p>Each source token is shaded by how far it survived up the pyramid ({num_stages} top-k "
        f"pooling{'' if num_stages == 1 else 's'}): {legend}</p>\n"
        f"<h2>Hypothesis</h2>\n<p>{html.escape(hypothesis)}</p>\n{reference_html}"
        f'<h2>Source ({len(pieces)} tokens)</h2>\n<div class="src">{"".join(spans)}</div>\n'
        "</body>\n</html>\n"
    )


@torch.no_grad()
def write_explain_page(
    model,
    spm,
    source_ids: list[int],
    pad_to_multiple: int,
    path: Path,
    *,
    title: str,
    hypothesis: str,
    reference: str | None,
) -> Path:
    """Encode one source alone (padded as in generation) and write its page to ``path``."""
    device = next(model.parameters()).device
    length = len(source_ids)
    width = -(-length // pad_to_multiple) * pad_to_multiple if pad_to_multiple else length
    width = min(width, model.cfg.max_source_positions)
    tokens = torch.full((1, width), model.cfg.pad_id, dtype=torch.long, device=device)
    tokens[0, :length] = torch.as_tensor(source_ids, device=device)
    encoder_out = model.encode(tokens, torch.tensor([length], device=device))
    stage, score = token_survival(encoder_out.pooling, length)
    pieces = [spm.IdToPiece(int(t)) for t in source_ids]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        render_page(
            pieces, stage, score, len(encoder_out.pooling), title=title, hypothesis=hypothesis, reference=reference
        ),
        encoding="utf-8",
    )
    return path
