"""The papers' protocols on the sandbox (GapEval gap score, ...), each explained by probes and patching."""
