"""imagegen: render the same fictional character again and again with a recognisably identical face."""

__version__ = "0.1.0"
