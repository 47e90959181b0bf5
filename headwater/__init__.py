"""headwater: keeps an LLM application's knowledge fresh.

This package is the ground floor everything else stands on, and imports nothing above it:
settings, event schemas, errors, freshness tokens and progress, topics, and the consumer
runtime with the Kafka clients.
"""

__version__ = "0.1.0"
