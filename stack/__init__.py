"""The local stack: a Kafka broker from Maven Central jars and a Milvus Lite server."""
