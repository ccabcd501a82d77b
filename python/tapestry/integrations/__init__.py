"""Adapters for other federated-learning frameworks.

* :mod:`tapestry.integrations.flower`: :class:`~tapestry.integrations.flower.TapestryStrategy`, a
  Flower strategy aggregating with any Tapestry rule (needs ``flwr``; imported on demand, so
  ``import tapestry`` never needs Flower).
* :mod:`tapestry.integrations.torchft`: :class:`~tapestry.integrations.torchft.TapestryManager`, a
  torchft ``Manager`` whose averaging allreduce (DiLoCo's outer step) is a robust, optionally
  compressed all-reduce (needs ``torchft >= 0.2, < 0.3``; imported on demand).
"""
