"""The federation: one round as composable parts.

- ``loop.py``: the :class:`~colnet_mpi.federation.loop.Federation` of a rank — strategies chosen
  from the config, the round loop (stages in order, each timed), the record, the run.
- ``stages.py``: the stages (train, exchange, group, intra, cross, redistribute, evaluate).
- ``grouping.py``, ``intra.py``, ``cross.py``: the three strategy protocols and their classes.
- ``schemes.py``: the registries of those strategies and the schemes (named triples); torch-free,
  the config reads its allowed names there.
- ``defense.py``: quarantine vote, screening inside groups, leader verification.
- ``recording.py``: a round's record (this rank's values -> the writer rank -> the file).
- ``context.py``: what one round knows as its stages run.
- ``state.py``, ``checkpoint.py``: what carries over between rounds, saved at round boundaries;
  ``resume.py``: where a run continues from; ``stop.py``: stop signals and test fault hooks.

This ``__init__`` imports nothing, so that ``schemes`` stays importable without torch or MPI.
"""
