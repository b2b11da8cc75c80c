"""What we ask of activations.

- ``uniprobe.probes.linear``: many linear probes at once (batched logistic / ridge), with controls.
- ``uniprobe.probes.lens`` / ``uniprobe.probes.tuned_lens``: logit lens and tuned lens at any position.
- ``uniprobe.probes.patching``, ``uniprobe.probes.kernels``: activation patching and its fused kernels.
- ``uniprobe.probes.plots``: matplotlib figures.

Submodules are imported explicitly (``from uniprobe.probes.linear import probe_store``); nothing here
imports ``experiments``.
"""
