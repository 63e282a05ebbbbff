"""The human feedback web app: labelers compare, rank or rate completions; the export feeds `rlhf reward`.

    python -m rlhf.label serve --candidates candidates.jsonl --db feedback.sqlite --task pair
    python -m rlhf.label add-labeler alice --db feedback.sqlite
    python -m rlhf.label export --db feedback.sqlite --out prefs.jsonl

It shares only the record formats of `rlhf.data` with the training code and imports no trainer.
"""
