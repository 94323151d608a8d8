"""The store wing: this node's own files. Paths and durable writes, identity and
`mesh-init`, keys, manifests, the append-only log and its index, and `Node`, which ties
them together. Imports only the core (envelope, errors, patterns, config)."""
