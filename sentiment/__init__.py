"""sentiment: a trio worker that classifies posts from a Redis Stream into PostgreSQL."""

__version__ = "0.1.0"
