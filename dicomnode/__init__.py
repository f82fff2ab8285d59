"""dicomnode: a DICOM-native node that turns CT series into DICOM SEG and TID 1500 SR.

The data flow is the architecture::

    receive -> spool + index -> series completion -> assemble -> analyse
      (segment, radiomics, predict) -> report (SEG, SR) -> deliver

PURE modules (``types``, ``errors``, ``series``, ``assemble``, ``analyse``, ``report``) do no
network and no disk writes and can be driven by tests with plain values; EDGE modules
(``receive``, ``spool``, ``deliver``, ``jobs``, ``node``) do the I/O. ``node`` is the only place
that builds EDGE objects.
"""

__version__ = "0.1.0"
