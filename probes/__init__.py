"""probes: measurements of loss-landscape geometry built on :mod:`landscape`.

Probes depend on ``landscape``; ``landscape`` never imports ``probes``.
"""
