"""Producers: what puts document events on Kafka (publisher, corpus replay, folder watch)."""
