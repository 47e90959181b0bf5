"""Consumers: the Kafka consumer groups (indexer, query answerer) and their loops."""
