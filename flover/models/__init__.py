"""Checkpoints shipped with flover, so the demo runs a trained model with no download.

``tiny-py`` is a byte-level GPT-2 trained on the Python standard library by
``tools/train_tiny.py``; its ``TRAINING.md`` records how. Its path is
``flover.loading.SHIPPED_MODEL``.
"""
