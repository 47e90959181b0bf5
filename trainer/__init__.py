"""Retraining: drift, the LoRA refresh policy and runs, the eval gate, the adapter registry."""


class TrainerError(Exception):
    """A retraining problem worth a one-line message (bad input, busy, nothing to do)."""
