"""fedmla coordinator: gRPC service, rounds, aggregation, store, dashboard.

Importing this package is cheap and pulls in no server code, so that workers may use
the shared codec modules that live here without the coordinator's runtime.
"""
