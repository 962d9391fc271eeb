"""Serving: the broker's policy, the client library, the HTTP gateway and the benchmark."""
