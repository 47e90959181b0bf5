"""Producers: the event schemas and everything that puts events on Kafka."""
