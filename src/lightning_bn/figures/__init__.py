"""Drawing logged histories with matplotlib (an optional dependency): styles, lines, bands, grids.

:mod:`~lightning_bn.figures.draw` holds the building blocks; the figures of ``lightning-bn plot``
(:mod:`lightning_bn.plot`) and of a reproduce run (:mod:`lightning_bn.reproduce.figures`) are
built from them. Importing this package does not import matplotlib; its modules do.
"""
