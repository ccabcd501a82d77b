"""Digits across 10 Flower clients with a sign-flip attacker, aggregated by a Tapestry rule."""
