"""The wire: every message that crosses a socket, its codec, the sockets that carry it, and who may send it."""
