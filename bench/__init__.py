"""
shardtcp's performance bench, run with ``python bench/run.py``.

The modules: ``lab`` (work folder, keys, certificates, process bookkeeping),
``targets`` (the processes measured and their configurations), ``backend``
(the bench's own TCP/TLS server, run as a process), ``clients`` (the load
generators), ``measure`` (CPU and memory from ``/proc``), ``report`` (tables)
and ``runs/`` (one module per measurement).  Only public APIs of shardtcp
are used, and a measurement that breaks stops the run with its reason.
"""
