"""TCP tunnels: the ClientHello SNI peek, the stream preamble and the edge policy (pure), and the splice loop."""
