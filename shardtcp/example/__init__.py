"""
What runs beside the proxy rather than inside it: the reference shard
(``shard``), the small certificate authority its certificates come from
(``pki``) and the ``shardtcp demo`` that puts them together (``demo``).

The proxy never imports this package; tests, the demo and the bench do.
"""
