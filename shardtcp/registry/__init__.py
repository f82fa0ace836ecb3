"""Shard registries beyond the configuration file: etcd (SPEC section 9)."""
