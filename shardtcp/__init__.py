"""
shardtcp: a secure layer-4 proxy on Twisted.

For each inbound TCP connection shardtcp identifies the target service (TLS
SNI or a preamble), asks the ShardResolver for the best shard at that moment,
connects to it and sends a PROXY protocol v2 header carrying a signed
PolicyContext before splicing the two sides together.
"""

__version__ = "0.1.0"
