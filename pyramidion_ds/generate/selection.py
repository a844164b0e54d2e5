"""``--selection-report FILE``: the selection figure (``data/selection.py``) of a model's pooling over inputs with
references, as JSON: per pooling layer (the last is the encoder output) the share of kept source pieces in the
document's own reference, the all-pieces, lead and other-document (control) baselines, and the
document-specific lift with a 95% bootstrap interval over documents.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..config import GenerationConfig, to_dict
from ..config.core import build
from ..data.selection import corpus_rows, layer_names, summarize
from ..errors import UsageError
from .inputs import Example

log = logging.getLogger(__name__)


@torch.no_grad()
def selection_report(model, spm, examples: list[Example], pad_to_multiple: int, batch_size: int = 4) -> dict:
    """Encode ``examples`` (which need references) in batches and summarize what the pooling kept."""
    from .runner import collate_sources

    if len(examples) < 2 or any(e.reference is None for e in examples):
        raise UsageError("--selection-report: needs 2 or more inputs, each with a reference summary")
    cfg, device = model.cfg, next(model.parameters()).device
    sources, kept, references, after_layers = [], [], [], []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        tokens, lengths = collate_sources(batch, cfg.pad_id, pad_to_multiple, cfg.max_source_positions, device)
        pooling = model.encode(tokens, lengths).pooling
        after_layers = [info.after_layer for info in pooling] or after_layers
        for row, example in enumerate(batch):
            sources.append([spm.IdToPiece(int(t)) for t in example.source])
            kept.append([info.source_positions[row][info.mask[row]].tolist() for info in pooling])
            references.append(spm.EncodeAsPieces(example.reference))
    if not after_layers:
        raise UsageError(f"--selection-report: the {cfg.variant} model pools nothing (no pooling layer)")
    report = summarize(corpus_rows(sources, kept, references), layer_names(after_layers))
    report["final_layer"] = layer_names(after_layers)[-1]
    report["kept"] = "the source position dominating each real slot (the member with the larger mixing weight)"
    return report


def write_selection_report(request, overrides: dict, path: str) -> dict | None:
    """Rank 0 loads the export that generation used, encodes its inputs and writes the report to ``path``."""
    import torch.distributed as dist

    from ..checkpoint.export import DTYPES, export_for, load_export
    from .runner import load_inputs

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:  # generation's process group
        return None
    device = torch.device("cuda" if torch.cuda.is_available() and not request.cpu else "cpu")
    export_dir = export_for(request.path, request.dtype)
    model, cfg, spm = load_export(export_dir, device, DTYPES[request.dtype])
    gen = build(GenerationConfig, {**to_dict(cfg.generation), **overrides}, prefix="generation.")
    model.cfg.hard_topk = model.cfg.hard_topk or gen.hard_topk
    inputs = load_inputs(request, gen, cfg, spm, export_dir)
    report = selection_report(model, spm, inputs.examples, cfg.source_pad_multiple)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out)
    final = report["layers"][report["final_layer"]]
    log.info(
        f"selection ({report['documents']} documents, {report['final_layer']}): own {final['own']:.3f} all "
        f"{final['all']:.3f} lead {final['lead']:.3f} control {final['control']:.3f} (all {final['control_all']:.3f}) "
        f"lift {final['lift']:+.3f} [{final['lift_ci95'][0]:+.3f}, {final['lift_ci95'][1]:+.3f}] -> {out}"
    )
    return report
