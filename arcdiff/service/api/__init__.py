"""HTTP layer: dependencies and one router per route module."""
