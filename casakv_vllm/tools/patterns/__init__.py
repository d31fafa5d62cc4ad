"""``casakv eval patterns``: how well the online pattern estimator's patterns hold on queries it did not see.

``measure`` (one layer: estimate, then held-out recall and density with the kernels' mask), ``run`` (the
model over held-out prompts), ``report`` (summaries, Markdown, JSON, plot), ``cli`` (the subcommand).
"""
