"""Transports: socket-like byte streams (TCP, TLS, KCP, HTTP Upgrade) under smux."""
