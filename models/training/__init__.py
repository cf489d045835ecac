"""Fine-tuning of the MiniLM backbone jointly with emotion heads (training tooling only).

torch is the ``train`` extra: the worker never imports this package. :mod:`.data` (label
mappings, the sentiment rule, the length-bucketed batch sampler) is pure Python/numpy;
:mod:`.bert`, :mod:`.finetune` and :mod:`.export` need torch.
"""
