"""Adapters for other federated-learning frameworks.

* :mod:`tapestry.integrations.flower`: :class:`~tapestry.integrations.flower.TapestryStrategy`, a
  Flower strategy aggregating with any Tapestry rule (needs ``flwr``; imported on demand, so
  ``import tapestry`` never needs Flower).
"""
