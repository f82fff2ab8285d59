"""Series-level decisions made from index state, without I/O (PURE).

:mod:`dicomnode.series.completion` decides when a series has finished arriving.
"""
