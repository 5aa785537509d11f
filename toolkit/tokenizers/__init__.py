"""Tokenizers of the toolkit; :mod:`toolkit.tokenizers.spec` knows their specs."""
