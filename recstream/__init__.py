"""recstream: real-time recommendation embeddings from a Kafka clickstream."""

__version__ = "0.1.0"
