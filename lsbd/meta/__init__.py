"""A volume's small JSON objects in the store: config, lease, snapshots, clone refs, pins."""
