"""Callbacks for the training frameworks people use, each importing its framework
only when imported itself (``import regext`` imports none of them):

- :mod:`regext.integrations.transformers`: ``PenaltyCallback`` for the Hugging Face
  ``Trainer`` (extra ``regext[transformers]``);
- :mod:`regext.integrations.lightning`: ``PenaltyCallback`` for PyTorch Lightning
  (extra ``regext[lightning]``).
"""
