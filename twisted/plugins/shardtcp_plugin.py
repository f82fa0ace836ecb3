"""
twistd plugin for shardtcp.

The application module is named as a string so that twistd's plugin scan
never imports shardtcp itself.
"""

from twisted.application.service import ServiceMaker

shardtcp = ServiceMaker(
    "shardtcp",
    "shardtcp.tap",
    "A secure layer-4 proxy routing each connection to the best shard",
    "shardtcp",
)
