"""KCP transport: wire framing, sessions, TLS over KCP, interop with kcp-go and kcptun."""
