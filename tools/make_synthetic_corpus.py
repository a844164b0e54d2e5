#!/usr/bin/env python3
"""Write the synthetic long-document corpus (filler + planted salient sentences) as jsonl splits.

python tools/make_synthetic_corpus.py --out data/synthetic --train 1000 --valid 50 --test 50
"""

import argparse
import sys

from pyramidion_ds.data.synthetic import write_corpus


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory for <split>.jsonl")
    p.add_argument("--train", type=int, default=1000, help="training documents")
    p.add_argument("--valid", type=int, default=50, help="validation documents")
    p.add_argument("--test", type=int, default=50, help="test documents")
    p.add_argument("--min-words", type=int, default=1500, help="shortest document, in words")
    p.add_argument("--max-words", type=int, default=2500, help="longest document, in words")
    p.add_argument("--min-salient", type=int, default=3, help="fewest planted sentences per document")
    p.add_argument("--max-salient", type=int, default=5, help="most planted sentences per document")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        paths = write_corpus(
            a.out,
            {"train": a.train, "valid": a.valid, "test": a.test},
            seed=a.seed,
            min_words=a.min_words,
            max_words=a.max_words,
            num_salient=(a.min_salient, a.max_salient),
            progress=True,
        )
    except ValueError as err:
        print(f"make_synthetic_corpus: error: {err}", file=sys.stderr)
        return 2
    for split, path in paths.items():
        print(f"{split}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
