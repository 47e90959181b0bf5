"""Consumers: the loops that read topics (indexer, query answerer, standing queries, adapter
follower) and the clients that read replies (asking, subscriptions, the truth reader)."""
