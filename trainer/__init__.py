"""Retraining: drift, the LoRA refresh policy and runs, the eval gate, the adapter registry."""
