"""A pipeline stage: its process, its TP group, continuous batching and the KV-cache bookkeeping."""
