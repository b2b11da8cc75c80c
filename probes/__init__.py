"""What we ask of activations.

- ``probes.linear``: many linear probes at once (batched logistic / ridge), with controls.
- ``probes.lens`` / ``probes.tuned_lens``: logit lens and tuned lens at any position.
- ``probes.patching``, ``probes.kernels``: activation patching and its fused kernels.
- ``probes.plots``: matplotlib figures.

Submodules are imported explicitly (``from probes.linear import probe_store``); nothing here
imports ``experiments``.
"""
