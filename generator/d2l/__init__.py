"""Doc-to-LoRA (Charakorn et al., 2026): the hypernetwork kind that has the base model itself read a text.

    config.py     D2LConfig: the architecture and the base model it reads
    context.py    chat template, chunks, and the base model's per-layer activations
    hypernet.py   D2LHypernet: Perceiver, per-layer heads, combining chunks with the bias LoRA
    base.py       loading the base model, checking it matches, and its content hash
    released.py   importing released checkpoints through an allow-list of their pickled classes
    generator.py  DocLoraGenerator: texts → PEFT adapters, with LoraGenerator's interface

docs/documents.md describes the kind for users.
"""
