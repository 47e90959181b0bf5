"""The index: chunking, embedding, the Milvus store and search."""
