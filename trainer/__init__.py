"""The trainer: data batches, the training loop, evaluation during training, ``dpr train``.

Nothing imports this package; it reads data files and writes checkpoints that the other stages load.
"""
