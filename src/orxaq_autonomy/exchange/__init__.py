"""The real-time exchange over NATS JetStream (docs/realtime.md): the wire protocol, the
listener that publishes this node's events and admits the others', and its status."""
