"""The embedded demo task: customer-support exchanges, their gold labeler, and a tiny base model.

    corpus.py   the generator of questions and replies of known quality
    gold.py     the gold score of any reply, simulated labelers who disagree with it, and
                personas with tastes of their own (the personalisation demo)
    base.py     the shipped base model (base_model/) and how it was pretrained
    build.py    `python -m rlhf.demo.build --out DIR` writes the demo data set
"""
