"""fedmla workers: local trainer, data, gRPC client, Ray simulation and Flower apps.

Kept import-light: submodules are imported where they are used.
"""
