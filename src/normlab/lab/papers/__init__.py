"""Experiments added to the lab one per module; each defines an :class:`~normlab.lab.spec.Experiment`
(``EXPERIMENT``) and registers the probes it measures with into :data:`normlab.lab.probes.PROBES`."""
