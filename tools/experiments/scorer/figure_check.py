"""What the selection figure (pyramidion_ds/data/selection.py) says of selectors whose behaviour is known, on a
data-bin's valid split, with no model: keep K of each source's pieces by

    random    K positions drawn uniformly                            -> lift ~ 0 (interval covering 0)
    generic   the pieces of the K most corpus-frequent content words  -> own and control both lifted, lift ~ 0
              of the *training* abstracts (domain words, not this document's)
    oracle    pieces of words in the document's own reference first  -> lift >> 0

    python tools/experiments/scorer/figure_check.py DATA_BIN [--keep 512] [--out figure_check.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from pyramidion_ds.data import SummarizationDataset  # noqa: E402
from pyramidion_ds.data.selection import content_words, corpus_rows, piece_words, summarize  # noqa: E402
from pyramidion_ds.data.spm import load_spm  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("--keep", type=int, default=512)
    parser.add_argument("--max-source", type=int, default=4096)
    parser.add_argument("--out")
    args = parser.parse_args()
    spm = load_spm(args.data)
    pieces = [spm.IdToPiece(i) for i in range(spm.GetPieceSize())]
    special = {0, 1, 2}

    def split(name):
        data = SummarizationDataset(args.data, name, args.max_source, 100000)
        out = []
        for i in range(len(data)):
            item = data[i]
            src = [pieces[t] for t in item["source"].tolist()]
            ref = [pieces[t] for t in item["target"].tolist() if t not in special]
            out.append((src, ref))
        return out

    frequency = collections.Counter(w for _, ref in split("train") for w in content_words(ref))
    valid = split("valid")
    rng = np.random.default_rng(0)
    sources, references = [s for s, _ in valid], [r for _, r in valid]
    kept = {"random": [], "generic": [], "oracle": []}
    for src, ref in valid:
        k = min(args.keep, len(src))
        kept["random"].append([rng.choice(len(src), size=k, replace=False).tolist()])
        words = piece_words(src)
        generic = sorted(range(len(src)), key=lambda i: -frequency.get(words[i], 0))
        kept["generic"].append([generic[:k]])
        own = content_words(ref)
        oracle = sorted(range(len(src)), key=lambda i: words[i] not in own)
        kept["oracle"].append([oracle[:k]])
    report = {
        name: summarize(corpus_rows(sources, k, references), ["kept"])["layers"]["kept"] for name, k in kept.items()
    }
    text = json.dumps({"keep": args.keep, "documents": len(valid), "selectors": report}, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
