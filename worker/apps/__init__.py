"""Apps that run both sides of the protocol: the ``fedmla`` command line, ``fedmla simulate``
(a coordinator plus Ray workers on one machine) and the benchmarks. The only modules of
the package allowed to import both :mod:`fedmla.coordinator` and the worker runtime."""
