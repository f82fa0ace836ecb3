"""
One module per measurement.  Each has ``run(lab, settings) -> dict`` and
``report(result) -> str``; ``run`` raises ``BenchError`` when it cannot
measure what it promises, so no row goes missing silently.
"""
