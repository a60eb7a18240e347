"""glimr: Global-Local IMage Retrieval."""
__version__ = "0.1.0"
