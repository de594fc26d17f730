"""The only code that moves model data between ranks.

- ``topology.py``: every communicator of a run (a private duplicate of the world, the neighbour
  graph, the per-round group and leader communicators built with ``Split``), and small numeric
  collectives (agreeing on errors, all-gathering ints, host names).
- ``buffers.py``: one module's floating-point state as one flat float32 vector and back
  (trainable parameters first, then BatchNorm statistics), and its CRC-32 checksum.
- ``transport.py``: sending, receiving and reducing those vectors with the upper-case (buffer)
  mpi4py calls only — never pickle — with every received buffer checked (size, finite values)
  and bytes counted per round; device buffers go to a CUDA-aware MPI directly, otherwise through
  pinned host memory.

Nothing here knows about rounds, schemes or metrics; communicators are always passed in.
"""
