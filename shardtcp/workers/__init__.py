"""
Worker processes (``[proxy] workers`` > 1, SPEC section 8).

``supervisor``: the process twistd runs becomes the control plane (it
holds the listening sockets, runs the health checks, the admin API and the
fleet's load sharing) and keeps N workers running; ``child``: a worker's
entry point (``python -m shardtcp.workers.child``), the data plane, built
by ``shardtcp.tap.build_service`` on the sockets it inherits; ``channel``:
the AMP commands between the two; ``aggregate``: the pure sums over the
workers (merged metrics, load, remote load, status lines).
"""
