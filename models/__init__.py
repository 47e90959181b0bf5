"""Models: the base LM the answers and the style adapters stand on, and the adapters' layout.

Both the trainer (which writes adapters) and the query consumers (which load them) import this;
neither reaches into the other.
"""
