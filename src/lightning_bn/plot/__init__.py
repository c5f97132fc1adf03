"""``lightning-bn plot`` and :func:`~lightning_bn.plot.run_figures.plot_runs`: the paper's figures of any logged runs.

:mod:`~lightning_bn.plot.run_logs` reads CSVLogger folders and reproduce runs;
:mod:`~lightning_bn.plot.run_figures` draws their figures with :mod:`lightning_bn.figures`.
"""
