"""The model side: its anatomy (one description of every supported architecture: embeddings,
blocks and their parts, final norm, head), the registry and loading, checkpoints, and placement
(layer-wise streaming of models larger than the device). ``anatomy`` is at the bottom: it imports
nothing else of quantlens.
"""
