"""The datasets quantlens evaluates, one module each: a module defines ``DATASET``, a
:class:`quantlens.evaluation.sources.DatasetInfo` (how an example is read, scored and estimated), and
:mod:`quantlens.evaluation.data` finds it by listing this package. A new dataset is one new module."""
