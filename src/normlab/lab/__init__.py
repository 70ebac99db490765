"""normlab's lab: rerun the batch-norm papers' experiments on real data and report beside their numbers.

``normlab lab run`` (see :mod:`normlab.lab.cli`) runs the experiments of
:mod:`normlab.lab.experiments` with the engine of :mod:`normlab.lab.engine` and writes the report of
:mod:`normlab.lab.report`.
"""
