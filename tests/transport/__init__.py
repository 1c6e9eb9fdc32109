"""Transports under smux: KCP (wire framing, sessions, interop with kcp-go and kcptun), TLS over memory BIOs, the HTTP-Upgrade wire."""
