"""Settings, quantizers and patching: what a setting is (its canonical form, whether it is the
reference), the uniform / power-transform fake quantizers, matched perturbations, and applying a
setting to a model (weights once, activation and KV-cache hooks) and undoing it.
"""
