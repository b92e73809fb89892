"""fedmla workers: local trainer, data, and (later) the gRPC client, Ray and Flower apps.

Kept import-light: submodules are imported where they are used.
"""
