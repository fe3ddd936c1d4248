"""`agescale bench NAME` implementations. Each prints JSON with `ratio` and `target`."""
