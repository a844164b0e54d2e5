"""Generation: consolidate ZeRO shards into an export dir, batched beam search with a KV cache, ROUGE.

    export.py  run dir -> export dir (safetensors + config + spm), load_export (never unpickles)
    search.py  beam search / sampling over encode + decode_step; exhaustive_search (the reference)
    inputs.py  data-dir split or text/jsonl file -> examples; world-size-independent batches per rank
    runner.py  pyramidion-generate end to end (1..N processes), outputs, ROUGE, explain pages
    rouge.py   ROUGE-1/2/L/Lsum via rouge_score;  explain.py  the HTML selection map
"""
