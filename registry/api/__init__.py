"""HTTP layer: thin routes over ``registry.services``; errors mapped to HTTP in ``problems``."""
