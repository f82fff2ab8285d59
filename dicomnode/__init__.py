"""dicomnode: a DICOM-native node that turns CT series into DICOM SEG and TID 1500 SR.

The data flow is the architecture::

    receive -> spool + index -> series completion -> assemble -> analyse
      (segment, radiomics, predict) -> report (SEG, SR) -> deliver

PURE modules (``types``, ``errors``, ``series``, ``assemble``, ``analyse``, ``report``) do no
network and no disk writes and can be driven by tests with plain values; EDGE modules
(``receive``, ``spool``, ``deliver``, ``jobs``, ``node``) do the I/O. ``node`` is the only place
that builds EDGE objects.
"""

import os as _os

__version__ = "0.1.0"

# OpenMP threads (PyTorch's and MKL's: the U-Net) sleep while they wait for work instead of
# spinning. On a node whose few cores are shared (the listener, radiomics workers, a PACS on
# the same host), a thread spinning at a barrier for a descheduled sibling burns the core that
# sibling needs: measured on 2 cores beside one busy process, the U-Net took 7-29 s instead of
# 2.5-3.3 s. Read by the OpenMP runtime when torch loads, hence here, before any stage imports
# it; an OMP_WAIT_POLICY already in the environment wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
