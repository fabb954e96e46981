"""Thin glue between :class:`ewc.EWC` and training frameworks, each an optional extra.

* :mod:`ewc.integrations.transformers` (``pip install 'ewc[transformers]'``): ``EWCTrainer``, a
  Hugging Face ``Trainer`` whose loss carries the penalty, with ``consolidate(dataset)`` and the EWC
  state saved in and resumed from its checkpoints.
* :mod:`ewc.integrations.lightning` (``pip install 'ewc[lightning]'``): ``EWCCallback``, a
  Lightning callback that adds the penalty's gradient, consolidates at the end of each ``fit`` and
  keeps the EWC state in Lightning checkpoints.

Nothing here is imported by ``import ewc``; each module imports its framework when it is imported
and names the extra to install when the framework is missing (:mod:`ewc.integrations.common`).
"""
