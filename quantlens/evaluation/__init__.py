"""Data and evaluation: the datasets (one module each in ``datasets/``, their registry in ``data``),
their requests scored by one primitive (``scoring.loglikelihood``: perplexity windows, documents,
Lambada's continuations, released rows), per-example NLL, the KL error, router flips, and the
residual-stream statistics recorded during evaluation.
"""
