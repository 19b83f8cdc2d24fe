"""A hostile Flower app, for tests only."""
