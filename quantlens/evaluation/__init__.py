"""Data and evaluation: datasets and their windows or documents, batched perplexity / Lambada with
per-example NLL, and the residual-stream statistics recorded during evaluation.
"""
