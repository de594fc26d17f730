"""The results file and what reads it (no MPI, no torch).

- ``record.py``: the per-round record declared once — what each rank packs, how the writer turns
  the gathered records into dataset rows, the HDF5 layout, and which axis each dataset grows on.
- ``writer.py``: the one writer rank's HDF5 file (appended and closed every round; truncated to
  the checkpointed round on resume; ``status`` running / finished / failed / preempted).
- ``partition.py``: the adjusted Rand index between two partitions.
- ``names.py``: metric, stage and exclusion-reason names shared by writer, reader and training.
- ``reader.py``: results files back into arrays, runs grouped by their differing settings,
  summaries over seeds; ``report.py`` and ``robustness.py``: ``colnet-mpi report``'s tables and
  figures.
"""
